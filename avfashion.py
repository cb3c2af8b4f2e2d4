"""AV-Fashion, the offline default data: real Fashion-MNIST images (Debian package dataset-fashion-mnist) and the
ten class names plus the digits "zero".."nine" spoken by the espeak-ng TTS engine with many voices (one voice is
one speaker; train and test voices are disjoint). Built once into a cache file keyed by its recipe:

    python avfashion.py       # builds the cache and prints what it holds
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import torch

from data import (DataConfig, DataError, ModalityData, cache_root, expected_audio_shape, logmel_stats, pick_tier, read_npz,
                  source_fingerprint, spill_path, stratified_subset, test_subset, waveforms_to_logmel, write_npz)
from residency import place, reuse

FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = FASHION_CLASSES + DIGITS  # audio label i < 10 is Fashion-MNIST class i
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
AVFASHION_VERSION = 1
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TTS_RATE = 22050  # espeak-ng's output rate


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) -> numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type {raw[2]:#x}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {dims} elements, file holds {data.size} (truncated?)")
    return data.reshape(dims).astype(np.dtype(dtypes[raw[2]]).newbyteorder("="))


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR) -> dict[str, np.ndarray]:
    root = Path(root)
    names = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    out = {}
    for k, n in names.items():
        p = next((root / (n + s) for s in (".gz", "") if (root / (n + s)).is_file()), None)
        if p is None:
            raise DataError(f"Fashion-MNIST file {n}[.gz] not found in {root}. Install the Debian package: "
                            f"sudo apt-get install dataset-fashion-mnist (or point data.root at the IDX files)")
        out[k] = read_idx(p)
    return out


def espeak_variants() -> list[str]:
    """Voice variant names known to the installed espeak-ng (about 100)."""
    out = _run_espeak(["--voices=variant"]).decode()
    names = [ln.split()[4][3:] for ln in out.splitlines()[1:] if len(ln.split()) >= 5 and ln.split()[4].startswith("!v/")]
    return sorted(set(names))


def _run_espeak(args: list[str]) -> bytes:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("espeak-ng not found: install the Debian package: sudo apt-get install espeak-ng")
    res = subprocess.run([exe, *args], capture_output=True, timeout=60)
    if res.returncode != 0:
        raise DataError(f"espeak-ng {' '.join(args)} failed: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout


def wav_bytes_to_array(raw: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes -> (int16 samples, rate), read by libsndfile (soundfile), which takes espeak-ng's
    streamed header (its size fields are placeholders) as it is."""
    try:
        info = soundfile.info(io.BytesIO(raw))
        if info.subtype != "PCM_16":
            raise DataError(f"expected 16-bit PCM, got {info.subtype}")
        wav, rate = soundfile.read(io.BytesIO(raw), dtype="int16")
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise DataError(f"not a readable WAV stream ({e})") from e
    return wav, rate


def synthesize(word: str, voice: tuple[str, str, int, int]) -> np.ndarray:
    accent, variant, wpm, pitch = voice
    raw = _run_espeak(["-v", f"{accent}+{variant}", "-s", str(wpm), "-p", str(pitch), "--stdout", word])
    wav, rate = wav_bytes_to_array(raw)
    if rate != TTS_RATE:
        raise DataError(f"espeak-ng produced {rate} Hz, expected {TTS_RATE}")
    return wav


def trim_and_centre(wav: np.ndarray, length: int, rel_threshold: float = 0.02, margin: int = 160) -> np.ndarray:
    """Cut leading/trailing silence (below rel_threshold of the peak, keeping `margin` samples), then
    centre the word in a window of `length` samples (centre-cropped if longer)."""
    a = np.abs(wav.astype(np.float32))
    loud = np.nonzero(a > rel_threshold * max(a.max(), 1.0))[0]
    if loud.size:
        wav = wav[max(loud[0] - margin, 0): loud[-1] + margin + 1]
    out = np.zeros(length, dtype=np.int16)
    if len(wav) >= length:
        s = (len(wav) - length) // 2
        return wav[s:s + length].copy()
    s = (length - len(wav)) // 2
    out[s:s + len(wav)] = wav
    return out


def avfashion_recipe(cfg: DataConfig) -> dict:
    return {"version": AVFASHION_VERSION, "n_voices": cfg.n_voices, "test_voice_frac": cfg.test_voice_frac,
            "seed": cfg.build_seed, "sample_rate": cfg.sample_rate, "clip_seconds": cfg.clip_seconds,
            "words": WORDS, "accents": ACCENTS}


def build_avfashion(cfg: DataConfig, progress: bool = True) -> Path:
    """Build (or reuse) the AV-Fashion cache file and return its path. Deterministic for a recipe."""
    import torchaudio.functional as AF
    from tqdm import tqdm

    recipe = avfashion_recipe(cfg)
    # keyed by the recipe and the Fashion-MNIST files; the espeak-ng version is stored inside and compared when
    # espeak-ng is installed (a cache copied to a machine without it still loads)
    key = hashlib.sha1(repr((sorted(recipe.items()), source_fingerprint(cfg.root or FASHION_MNIST_DIR))).encode()).hexdigest()[:10]
    path = cache_root(cfg) / f"avfashion-v{AVFASHION_VERSION}-{key}.npz"
    espeak = _run_espeak(["--version"]).decode().strip() if shutil.which("espeak-ng") else None
    z = read_npz(path)
    if z is not None:
        if espeak is None or str(z.get("espeak", "")) == espeak:
            return path
        print(f"{path} was built with another espeak-ng ({z.get('espeak', 'unknown')}); rebuilding it with {espeak}")
    fm = load_fashion_mnist(cfg.root or FASHION_MNIST_DIR)
    variants = espeak_variants()
    if not variants:
        raise DataError("espeak-ng lists no voice variants (--voices=variant); is espeak-ng-data installed?")
    rng = np.random.default_rng(cfg.build_seed)
    length = int(round(cfg.clip_seconds * cfg.sample_rate))

    seen, voices, clips = set(), [], []
    tried = set()
    bar = tqdm(total=cfg.n_voices, desc="AV-Fashion voices (espeak-ng)", disable=None if progress else True, leave=False)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        while len(voices) < cfg.n_voices and len(tried) < 20 * cfg.n_voices:
            voice = (ACCENTS[rng.integers(len(ACCENTS))], variants[rng.integers(len(variants))],
                     int(rng.integers(110, 221)), int(rng.integers(15, 86)))
            if voice in tried:
                continue
            tried.add(voice)
            wavs = list(pool.map(lambda w: synthesize(w, voice), WORDS))
            hashes = [hashlib.sha1(w.tobytes()).hexdigest() for w in wavs]
            if any(h in seen for h in hashes) or len(set(hashes)) < len(hashes):
                continue  # a voice combination whose audio duplicates another's is the same speaker
            seen.update(hashes)
            voices.append(voice)
            clips.append(wavs)
            bar.update(1)
    bar.close()
    if len(voices) < cfg.n_voices:
        raise DataError(f"espeak-ng gave only {len(voices)} distinct voices; lower data.n_voices")

    audio, words, speaker = [], [], []
    for v, wavs in enumerate(clips):
        for w, wav in enumerate(wavs):
            x = AF.resample(torch.from_numpy(wav.astype(np.float32)), TTS_RATE, cfg.sample_rate)
            audio.append(trim_and_centre(x.round().clamp(-32768, 32767).to(torch.int16).numpy(), length))
            words.append(w)
            speaker.append(v)
    order = rng.permutation(len(voices))
    n_test = max(1, int(round(cfg.test_voice_frac * len(voices))))
    test_voices = np.zeros(len(voices), dtype=bool)
    test_voices[order[:n_test]] = True

    write_npz(path, dict(image_train_x=fm["train_x"], image_train_y=fm["train_y"].astype(np.int64),
                         image_test_x=fm["test_x"], image_test_y=fm["test_y"].astype(np.int64),
                         audio=np.stack(audio), audio_y=np.asarray(words, dtype=np.int64),
                         audio_speaker=np.asarray(speaker, dtype=np.int64), test_voice=test_voices,
                         voices=np.asarray(["{}+{} s{} p{}".format(*v) for v in voices]), recipe=np.asarray(repr(recipe)),
                         espeak=np.asarray(espeak or "")))
    return path


def _mapped_logmels(cfg: DataConfig, path: Path, clip: tuple, n_train: int, n_test: int):
    """The disk tier's log-mels of an earlier load (train, test), mapped, when both files are there: a load in a
    process that lives for one message (a Flower ClientApp) then computes none. None otherwise."""
    maps = [reuse(spill_path(cfg, str(path), "audio", split), (n, *clip))
            for split, n in (("train", n_train), ("test", n_test))]
    return None if None in maps else tuple(m.tensor for m in maps)


def load_avfashion(cfg: DataConfig, device, progress: bool = True) -> dict[str, ModalityData]:
    path = build_avfashion(cfg, progress=progress)
    z = read_npz(path)
    if z is None:
        raise DataError(f"AV-Fashion cache {path} could not be read back right after it was built: check the disk")
    parts = {}  # modality: (train_x, train_y, test_x, test_y, classes, mean, std, groups...), samples not yet placed
    if "image" in cfg.modalities:
        tx = torch.from_numpy(z["image_train_x"]).unsqueeze(1)
        ty = torch.from_numpy(z["image_train_y"])
        keep = torch.from_numpy(stratified_subset(ty, cfg.max_train_images, cfg.build_seed))
        tx, ty = tx[keep], ty[keep]
        mean = tx.float().mean() / 255
        std = tx.float().std() / 255
        keep_te = torch.from_numpy(test_subset(z["image_test_y"], cfg))
        parts["image"] = (tx, ty.to(device), torch.from_numpy(z["image_test_x"]).unsqueeze(1)[keep_te],
                          torch.from_numpy(z["image_test_y"])[keep_te].to(device), list(FASHION_CLASSES),
                          mean.view(1).to(device), std.view(1).to(device))
    if "audio" in cfg.modalities:
        test = torch.from_numpy(z["test_voice"][z["audio_speaker"]])
        y, spk = torch.from_numpy(z["audio_y"]).to(device), torch.from_numpy(z["audio_speaker"]).to(device)
        tr, te = (~test).to(device), test.to(device)
        clip = expected_audio_shape(cfg, z["audio"].shape[1])
        need = sum(p[0].nbytes + p[2].nbytes for p in parts.values()) + len(test) * int(np.prod(clip)) * 2
        tier = pick_tier(cfg, device, need)
        spec = _mapped_logmels(cfg, path, clip, int((~test).sum()), int(test.sum())) if tier == "disk" else None
        if spec is None:
            spec, _ = waveforms_to_logmel(torch.from_numpy(z["audio"]), cfg, device, seed=cfg.build_seed)
            spec = (spec[tr], spec[te])
        mean, std = logmel_stats(spec[0])
        parts["audio"] = (spec[0], y[tr], spec[1], y[te], list(WORDS), mean, std, spk[tr], spk[te])
    else:
        tier = pick_tier(cfg, device, sum(p[0].nbytes + p[2].nbytes for p in parts.values()))
    out = {}
    for m, (tx, ty, ex, ey, *rest) in parts.items():
        (tx, m1), (ex, m2) = (place(x, tier, device, spill_path(cfg, str(path), m, split))
                              for x, split in ((tx, "train"), (ex, "test")))
        out[m] = ModalityData(tx, ty, ex, ey, *rest, residency=tier, maps=tuple(a for a in (m1, m2) if a))
    return out


if __name__ == "__main__":
    cfg = DataConfig()
    p = build_avfashion(cfg)
    z = np.load(p)
    print(f"AV-Fashion cache: {p}")
    print(f"images: {z['image_train_x'].shape[0]} train, {z['image_test_x'].shape[0]} test; "
          f"audio: {len(z['audio'])} clips of {len(WORDS)} words from {len(z['voices'])} voices "
          f"({int(z['test_voice'].sum())} held out)")
    sys.exit(0)
