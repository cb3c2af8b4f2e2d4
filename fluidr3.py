"""The FluidR3 task: instrument notes of the General MIDI soundfont rendered offline by fluidsynth, labelled by GM
family; the audio dataset `fluidr3` of catalog.py and the held-out-instrument task of downstream.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from data import DataConfig, DataError, MissingData
from readers import BadFiles, decode_all

GM_FAMILIES = ["piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass", "reed",
               "pipe", "synth lead", "synth pad", "synth effects", "ethnic", "percussive", "sound effects"]


def write_midi(path: Path, program: int, notes: list[tuple[int, int]], spacing_s: float, dur_s: float) -> None:
    """A format-0 Standard MIDI File: one program change, then each (pitch, velocity) as a note of
    dur_s seconds every spacing_s seconds (480 ticks per quarter at 120 bpm: 960 ticks per second)."""
    def vlq(n):
        out = [n & 0x7F]
        n >>= 7
        while n:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes(reversed(out))
    on, off = int(dur_s * 960), int((spacing_s - dur_s) * 960)
    ev = bytearray(vlq(0) + bytes([0xC0, program]))
    for i, (pitch, vel) in enumerate(notes):
        ev += vlq(0 if i == 0 else off) + bytes([0x90, pitch, vel])
        ev += vlq(on) + bytes([0x80, pitch, 0])
    ev += vlq(int(spacing_s * 960)) + bytes([0xFF, 0x2F, 0x00])
    path.write_bytes(b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big")
                     + (480).to_bytes(2, "big") + b"MTrk" + len(ev).to_bytes(4, "big") + bytes(ev))


FLUIDR3_PITCHES = (40, 48, 55, 62, 69, 76)
FLUIDR3_VELOCITIES = (40, 60, 80, 100, 120)


def render_fluidr3(sf2: Path, cfg: DataConfig, bad: BadFiles, programs=range(128)) -> dict:
    """Instrument notes of the General MIDI soundfont rendered by fluidsynth: every program x 6 pitches x
    5 velocities, one second each (0.8 s note + release), labelled by GM family (program // 8, 16 classes).
    The 8th program of every family is held out as the test set (unseen instruments)."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise DataError("fluidr3: fluidsynth not found: sudo apt-get install fluidsynth fluid-soundfont-gm")
    if not Path(sf2).is_file():
        raise MissingData("fluidr3", Path(sf2), "the soundfont file")
    notes = [(p, v) for p in FLUIDR3_PITCHES for v in FLUIDR3_VELOCITIES]
    sr, length, spacing = cfg.sample_rate, int(cfg.sample_rate * 1.0), 1.5

    def render(program):
        with tempfile.TemporaryDirectory() as d:
            mid, wav = Path(d) / "n.mid", Path(d) / "n.wav"
            write_midi(mid, program, notes, spacing, 0.8)
            res = subprocess.run([exe, "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.6", "-r", str(sr), "-F", str(wav),
                                  str(sf2), str(mid)], capture_output=True, timeout=300)
            if res.returncode != 0 or not wav.is_file():
                raise DataError(f"fluidsynth failed for program {program}: {res.stderr.decode()[-300:]}")
            import soundfile as sf
            x, rate = sf.read(str(wav), dtype="float32", always_2d=True)
        if rate != sr:
            raise DataError(f"fluidsynth rendered {rate} Hz instead of {sr} Hz")
        hop = int(spacing * sr)  # note i starts at i * hop: slice from the start, no centring
        x = np.pad(x.mean(axis=1), (0, max(0, hop * len(notes) + length - len(x))))
        return [(np.clip(x[i * hop: i * hop + length], -1, 1) * 32767).round().astype(np.int16)
                for i in range(len(notes))]
    clips = decode_all(render, list(programs), workers=os.cpu_count() or 2)
    xs, ys, groups, test = [], [], [], []
    for program, cs in zip(programs, clips):
        for c in cs:
            if np.abs(c).max() < 30:  # ~ -60 dBFS: this program is silent at this pitch
                bad.note("silent notes dropped")
                continue
            xs.append(c)
            ys.append(program // 8)
            groups.append(program)
            test.append(program % 8 == 7)
    xs, ys, groups, test = np.stack(xs), np.array(ys), np.array(groups), np.array(test)
    return {"train_x": xs[~test], "train_y": ys[~test], "train_group": groups[~test], "test_x": xs[test],
            "test_y": ys[test], "test_group": groups[test], "classes": list(GM_FAMILIES)}
