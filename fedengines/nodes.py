"""Node-local data: a real federation, where each Flower SuperNode trains on its own files and the server holds none.

    python -m fedengines.flower_exec --root-certificates ca.crt --auth-supernode-private-key key \
        --superlink HOST:PORT --node-config 'data-root="/data/site1"'      # docs/engines.md: credentials, enrolment
    flwr run . CONNECTION --run-config "config='configs/smoke.yaml' mode='node-local' ..."

A node's data root holds `images/` (image files, in class folders or not), `audio/` (audio files, e.g. the
audiofolder layout: a labels.csv and the files it names), or both. Labels are never read: pretraining does not use
them. Each node decodes its files to the inputs the run's config describes (catalog.input_shapes: the image side and
channels, the audio front-end) and standardises them with its own statistics (no data leave a node, so there are no
global ones). The decoded samples are kept in the cache (memory-mapped when read), keyed by the files and the recipe,
so a node decodes its files once and every later message maps them.

On the server, `NodeFederation` stands for engine.Clients: one client per accepted SuperNode (sampled with our
seeded sample_clients over their sorted ids), a model built from the config alone, and a labelled evaluation set
only if the server was given one (the config's dataset; else the kNN monitor and the final probe are skipped).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import readers
import runtime
from catalog import input_shapes, load_data
from data import (DataConfig, DataError, ModalityData, image_stats, logmel_stats, pick_tier, spill_path,
                  waveforms_to_logmel)
from engine import Clients, PretrainConfig
from modality_specs import MODALITIES
from models import build_model
from residency import place

DATA_ROOT = "data-root"                     # the --node-config key naming a SuperNode's data
FOLDERS = {"image": "images", "audio": "audio"}
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
LAYOUT = "DATA_ROOT/images/ (image files, any sub-folders) and/or DATA_ROOT/audio/ (audio files, labels.csv optional)"


class NodeDataError(DataError):
    """A SuperNode's own data cannot be used (no data root, an empty or unreadable folder, too few samples)."""


def load_node_local_config(config, overrides) -> PretrainConfig:
    """A config as a node-local run reads it before the nodes answer: fed.clients becomes the number of accepted
    nodes, known only then, so until then any number will do."""
    from settings import load_config
    return load_config(PretrainConfig, config, [*overrides, "--fed.clients=1000000"])


def node_root(node_config) -> Path:
    """The data root a SuperNode was started with (--node-config 'data-root="..."')."""
    root = node_config.get(DATA_ROOT) if node_config else None
    if not root:
        raise NodeDataError(f"this SuperNode was started without its data: start it with flower-supernode ... "
                            f"--node-config '{DATA_ROOT}=\"/path/to/its/data\"' ({LAYOUT})")
    return Path(str(root)).expanduser()


def list_files(root: Path) -> dict[str, list[Path]]:
    """{modality: sorted files} under a node's data root; an error naming the root when it holds nothing usable."""
    if not root.is_dir():
        raise NodeDataError(f"{DATA_ROOT} {root}: no such folder (expected {LAYOUT})")
    exts = {"image": readers.IMAGE_EXTS, "audio": AUDIO_EXTS}
    out = {}
    for m, folder in FOLDERS.items():
        d = root / folder
        try:
            if d.is_dir():
                out[m] = sorted(p for p in d.rglob("*") if p.suffix.lower() in exts[m] and p.is_file())
        except OSError as e:
            raise NodeDataError(f"{DATA_ROOT} {root}: {folder}/ cannot be read ({e}): fix its permissions") from e
    if not any(out.values()):
        found = ", ".join(f"{FOLDERS[m]}/ with no {m} files" for m in out) or "neither images/ nor audio/"
        raise NodeDataError(f"{DATA_ROOT} {root}: nothing to train on ({found}); expected {LAYOUT}")
    return {m: v for m, v in out.items() if v}


def _decode(m: str, files: list[Path], shape: tuple, cfg: DataConfig, bad) -> dict:
    """One modality's files -> its samples as the model reads them (uint8 images, fp16 log-mels) and their
    per-channel mean and std (the node's own: kept with the samples, so a message never reads them all again)."""
    if m == "image":
        mode = "L" if shape[0] == 1 else "RGB"

        def one(p):
            x = readers.read_image(p, shape[1], bad, mode)
            return None if x is None else (x,)
        (x,), _ = readers.decode_into(one, files, [shape], [np.uint8], spill=bad.spill)
    else:
        length = int(round(cfg.clip_seconds * cfg.sample_rate))

        def one(p):
            w = readers.read_audio(p, cfg.sample_rate, length, bad)
            return None if w is None else (w,)
        (wav,), _ = readers.decode_into(one, files, [(length,)], [np.int16], spill=bad.spill)
        x = waveforms_to_logmel(wav, cfg, "cpu", seed=cfg.build_seed, tier="host")[0].numpy() if len(wav) else wav
    bad.finish(len(files))
    if not len(x):
        raise NodeDataError(f"none of the {len(files)} {m} files could be read")
    mean, std = image_stats(x, "cpu") if m == "image" else logmel_stats(torch.from_numpy(x))
    return {"x": x, "mean": mean.numpy(), "std": std.numpy(), "classes": []}


def load_node(root: Path, cfg: DataConfig, device) -> dict[str, ModalityData]:
    """The trained modalities a node holds, decoded (once: cached) and standardised with the node's own statistics."""
    files = list_files(root)
    shapes = input_shapes(cfg)
    held = [m for m in MODALITIES if m in cfg.modalities and m in files]
    if not held:
        raise NodeDataError(f"{DATA_ROOT} {root} holds only {', '.join(files)} but the run trains "
                            f"{', '.join(cfg.modalities)}")
    arrays = {}
    for m in held:
        params = {"shape": shapes[m], "files": len(files[m])}
        if m == "audio":
            params.update(sr=cfg.sample_rate, clip=cfg.clip_seconds, mel=(cfg.n_mels, cfg.win_ms, cfg.hop_ms,
                                                                           cfg.dither_db), seed=cfg.build_seed)
        try:
            arrays[m] = readers.cached("node", m, root / FOLDERS[m], cfg, params,
                                        lambda bad, m=m: _decode(m, files[m], shapes[m], cfg, bad))
        except DataError as e:  # unreadable files (too many, or all of them): named with the node's folder
            raise NodeDataError(f"{DATA_ROOT} {root}: {FOLDERS[m]}/: {e}") from e
    tier = pick_tier(cfg, device, sum(a["x"].nbytes for a in arrays.values()))
    out = {}
    for m, a in arrays.items():
        x, mapped = place(a["x"], tier, device, spill_path(cfg, a["source"], m, "train"))
        mean, std = (torch.as_tensor(np.array(a[k]), device=device) for k in ("mean", "std"))
        none = torch.zeros(0, dtype=torch.long, device=device)
        out[m] = ModalityData(x, torch.zeros(len(x), dtype=torch.long, device=device), x[:0], none, [], mean, std,
                              residency=tier, maps=(mapped,) if mapped else ())
    return out


def node_clients(cfg: PretrainConfig, root: Path, device) -> Clients:
    """A SuperNode's client runtime: its own data as one client (slot 0), the model built from the config alone
    (every modality of the run, so the global weights load whatever the node holds)."""
    data = load_node(root, cfg.data, device)
    for m, md in data.items():
        bs = cfg.optim.batch_for(m)
        if len(md.train_x) < bs:
            raise NodeDataError(f"{DATA_ROOT} {root}: {len(md.train_x)} {m} samples, fewer than one batch "
                                f"({'optim.batch_size_audio' if bs != cfg.optim.batch_size else 'optim.batch_size'}"
                                f"={bs}): give the node more data or lower the batch size")
    parts = [{m: np.arange(len(md.train_x)) for m, md in data.items()}]
    return Clients(cfg, device, data=data, parts=parts, shapes=input_shapes(cfg.data))


class NodeFederation:
    """The server's view of a federation of SuperNodes with their own data (engine.Clients' server-side part):
    client i is the i-th accepted node (sorted ids), `counts[i]` what it holds; the model comes from the config
    alone; `data` is the labelled evaluation set when the server has one, else empty (nothing is evaluated)."""

    def __init__(self, cfg: PretrainConfig, device, counts: list[dict], evaluate: bool = True, progress: bool = False):
        self.cfg, self.device, self.counts = cfg, device, counts
        self.input_shapes = input_shapes(cfg.data)
        try:
            self.data = load_data(cfg.data, device, progress=progress) if evaluate else {}
        except DataError as e:
            raise DataError(f"the server's labelled evaluation set: {str(e).rstrip('.')}. Give the server that dataset, "
                            f"or run without one (run config eval-data=false: no kNN monitor, no final probe)") from e
        for m, md in self.data.items():
            if tuple(md.shape) != tuple(self.input_shapes[m]):
                raise DataError(f"the server's evaluation set ({cfg.data.dataset}) gives {m} inputs {md.shape}, but the "
                                f"config describes {self.input_shapes[m]} for the nodes: make them agree")
        self.model = build_model(cfg.model, self.input_shapes).to(device)
        self.scaler = runtime.make_scaler(device, cfg.run.amp)
        self.clients = [{m: n for m, n in c.items() if m in cfg.data.modalities} for c in counts]
        self.parts = self.clients
        self.modalities = tuple(m for m in MODALITIES if m in cfg.data.modalities)

    @property
    def train_samples(self) -> dict[str, int]:
        return {m: sum(c.get(m, 0) for c in self.clients) for m in self.modalities}

    def holds(self, cid: int) -> bool:
        return bool(self.clients[cid])

    def input_stats(self) -> dict:
        return {}  # each node standardised with its own statistics: there are no global ones to keep


def write_demo_node(root: Path, cfg: DataConfig, images: int = 0, clips: int = 0, seed: int = 0) -> Path:
    """A node data root of seeded synthetic files in the node layout (PNG images of the config's side, in two class
    folders; one-second-style WAV tones of the config's clip length, with a labels.csv): for trying a deployment,
    the tests and scripts/bench_engines.py. Real nodes hold real files in the same layout."""
    import wave
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    side = input_shapes(DataConfig(**{**cfg.__dict__, "modalities": ("image",)}))["image"]
    for i in range(images):
        d = root / FOLDERS["image"] / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        x = rng.integers(0, 256, (side[1], side[2], side[0]), dtype=np.uint8)
        Image.fromarray(x[..., 0] if side[0] == 1 else x).save(d / f"{i:05d}.png")
    if clips:
        (root / FOLDERS["audio"]).mkdir(parents=True, exist_ok=True)
        t = np.arange(int(round(cfg.clip_seconds * cfg.sample_rate))) / cfg.sample_rate
        rows = ["file,label"]
        for i in range(clips):
            w = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(len(t))
            with wave.open(str(root / FOLDERS["audio"] / f"{i:05d}.wav"), "wb") as f:
                f.setnchannels(1), f.setsampwidth(2), f.setframerate(cfg.sample_rate)
                f.writeframes((np.clip(w, -1, 1) * 32767).astype("<i2").tobytes())
            rows.append(f"{i:05d}.wav,tone{i % 2}")
        (root / FOLDERS["audio"] / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
