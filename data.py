"""The data model: the data config, one modality's tensors on the device (`ModalityData`), the log-mel front-end
that turns waveforms into 1-channel images, seeded class-stratified subsets, and the decode-once cache files.
Which datasets exist and how they are read is catalog.py; the file formats are readers.py and avfashion.py.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from augment import AudioAugConfig, ImageAugConfig
from modality_specs import MODALITIES
from settings import ConfigError, UserError, check_range, expand_path


class DataError(UserError, RuntimeError):
    """A dataset problem the user can fix (missing files or packages, unreadable data)."""


class MissingData(DataError):
    """Files of a dataset are not where they should be; catalog.py adds the dataset's official layout."""

    def __init__(self, name: str, root, what: str):
        self.name, self.root, self.what = name, Path(root), what
        super().__init__(f"{name}: {what} not found under {root}")


@dataclass
class DataConfig:
    dataset: str = "avfashion"        # avfashion | vggsound (paired) | IMAGE+AUDIO, e.g. cifar10+esc50 (catalog.DATASETS)
    modalities: tuple[str, ...] = ("image", "audio")  # both = FSSUAVL; one = the separate-model baselines
    root: Optional[str] = None        # files of a paired dataset; None = its default location
    image_root: Optional[str] = None  # files of the image dataset of IMAGE+AUDIO; None = $FSSUAVL_DATA/NAME or ~/data/NAME
    audio_root: Optional[str] = None  # files of the audio dataset of IMAGE+AUDIO (fluidr3: the .sf2 soundfont)
    cache_dir: Optional[str] = None   # None = $FSSUAVL_CACHE or ~/.cache/fssuavl
    download: bool = False            # fetch datasets torchvision can download (CIFAR, STL-10) when missing
    image_size: int = 0               # decoded image side for folder/JPEG datasets (0 = the dataset's own, 64 otherwise)
    test_fold: int = 1                # ESC-50 (1-5) / UrbanSound8K (1-10): the official fold held out for testing
    max_bad_frac: float = 0.01        # stop when more than this fraction of files is unreadable or corrupt
    max_train_images: int = 0         # a seeded, class-stratified subset of N training images (0 = all); for short CPU runs
    # AV-Fashion build (the recipe: changing any of these builds a new cache entry)
    n_voices: int = 120
    test_voice_frac: float = 0.2
    build_seed: int = 0
    # audio front-end
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    n_mels: int = 128
    win_ms: float = 25.0
    hop_ms: float = 10.0
    dither_db: float = -60.0          # white noise (dBFS) added before the mel so digital silence is not exact zeros
    # kNN monitor: labelled held-out data (never used in pretraining)
    knn_bank: int = 10000             # training samples per modality in the bank: seeded, class-stratified (0 = all)
    knn_queries: int = 2000           # test samples per modality: seeded, class-stratified (0 = all)
    knn_k: int = 0                    # kNN neighbours; 0 = suited to the bank: half the smallest class's bank size, 5..200
    image_aug: ImageAugConfig = field(default_factory=ImageAugConfig)
    audio_aug: AudioAugConfig = field(default_factory=AudioAugConfig)

    def __post_init__(self):
        check_range("data.max_bad_frac", self.max_bad_frac, lo=0.0, hi=1.0)
        check_range("data.image_size", self.image_size, lo=0, hi=4096)
        if not self.modalities or set(self.modalities) - set(MODALITIES) or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"data.modalities={list(self.modalities)}: expected a non-empty subset of {list(MODALITIES)}")
        check_range("data.n_voices", self.n_voices, lo=2, hi=2000)
        check_range("data.test_voice_frac", self.test_voice_frac, lo=0.0, hi=1.0, lo_open=True)
        check_range("data.sample_rate", self.sample_rate, lo=1000, hi=384_000)
        check_range("data.clip_seconds", self.clip_seconds, lo=0.0, lo_open=True, hi=600.0)
        check_range("data.n_mels", self.n_mels, lo=8, hi=1024)
        check_range("data.test_fold", self.test_fold, lo=1, hi=10)
        check_range("data.dither_db", self.dither_db, hi=0.0)
        for k in ("root", "image_root", "audio_root", "cache_dir"):
            setattr(self, k, expand_path(getattr(self, k), f"data.{k}"))
        check_range("data.max_train_images", self.max_train_images, lo=0)
        for k in ("knn_bank", "knn_queries", "knn_k"):
            check_range(f"data.{k}", getattr(self, k), lo=0)
        if self.hop_ms <= 0 or self.win_ms < self.hop_ms or self.win_ms > 1000:
            raise ConfigError(f"data.win_ms={self.win_ms}, data.hop_ms={self.hop_ms}: need 0 < hop_ms <= win_ms <= 1000")


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("FSSUAVL_CACHE") or Path.home() / ".cache" / "fssuavl")


# ----------------------------------------------------------------------------- subsets

def stratified_subset(y, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subset of n of the labels `y` (numpy or tensor): each
    class keeps its share of n (largest remainders get the leftover), drawn at random inside the class.
    n <= 0 or n >= len(y) gives every index. Never the first n, which on a class-sorted list (Tiny-ImageNet's
    training folders, SpeechCommands) would cover only the first classes."""
    y = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[j] += 1
    out = [rng.choice(np.nonzero(y == c)[0], size=k, replace=False) for c, k in zip(classes, take) if k]
    return np.sort(np.concatenate(out))


# ----------------------------------------------------------------------------- caches

CONTENT_HASHED = (".csv", ".txt", ".tsv", ".json", ".meta")  # label and list files a user edits in place


def source_fingerprint(*paths) -> str:
    """A digest of what a cache entry was built from: every file under `paths` (files or folders) with its
    relative name, size and modification time, and for label and list files its content.
    Editing, adding or removing a file changes it, even a same-size edit of labels.csv with its mtime restored,
    so a stale cache is never reused. Large data files are keyed by size and mtime (hashing every clip of a
    dataset at each load would cost more than it protects)."""
    h = hashlib.sha1()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file()) if root.is_dir() else []
        h.update(str(root.resolve()).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(root) if f != root else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            if f.suffix.lower() in CONTENT_HASHED:  # not every image: 100 000 small JPEGs read at each load
                h.update(hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()[:12]


def read_npz(path: Path, warn=print) -> dict | None:
    """Every array of a cache file, or None (with a message naming the file) when it is missing, truncated or
    corrupt, so the caller rebuilds it."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile, zlib and numpy raise several types for a damaged file
        warn(f"cache {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); rebuilding it")
        return None


def write_npz(path: Path, arrays: dict) -> None:
    """Write a cache file atomically through a temp name unique to this process and call, so two builds at
    once never share (and break) one temp file; the last rename wins, with the same content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the data in memory

@dataclass
class ModalityData:
    """One modality's train/test tensors. Images: uint8 (N, C, H, W). Audio: float16 log-mel (N, 1, F, T)
    in raw log-power units; `mean`/`std` (per channel) normalise either after augmentation."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    train_group: Optional[torch.Tensor] = None  # natural client id (speaker) where the data has one
    test_group: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "ModalityData":
        mv = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return ModalityData(**mv)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 image or raw log-mel -> normalised float32."""
        x = x.float()
        return self.standardize(x / 255.0 if self.train_x.dtype == torch.uint8 else x)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Float (B, C, H, W) in [0, 1] (images) or raw log-power (audio) -> per-channel zero mean, unit std."""
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- audio front-end

class LogMel(torch.nn.Module):
    """Waveform (B, L) float in [-1, 1] -> log-mel power (B, 1, n_mels, frames)."""

    def __init__(self, sample_rate: int, n_mels: int, win_ms: float, hop_ms: float):
        super().__init__()
        import torchaudio
        win = int(round(sample_rate * win_ms / 1000))
        n_fft = win
        if n_fft // 2 + 1 < 3 * n_mels:  # too few FFT bins leave the lowest mel filters empty: zero-pad
            n_fft = 1 << (6 * n_mels - 1).bit_length()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win, hop_length=int(round(sample_rate * hop_ms / 1000)),
            n_mels=n_mels, power=2.0)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(wav) + 1e-10).unsqueeze(1)


def waveforms_to_logmel(wav: torch.Tensor, cfg: DataConfig, device, seed: int = 0, batch: int = 512) -> torch.Tensor:
    """int16 (N, L) -> float16 log-mel (N, 1, F, T) on `device`, with the configured dither added
    (seeded, so the features are reproducible)."""
    front = LogMel(cfg.sample_rate, cfg.n_mels, cfg.win_ms, cfg.hop_ms).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    amp = 10 ** (cfg.dither_db / 20)
    out = []
    for i in range(0, len(wav), batch):
        x = wav[i:i + batch].to(device).float() / 32768.0
        x = x + amp * torch.randn(x.shape, generator=g, device=device)
        out.append(front(x).half())
    return torch.cat(out)


def logmel_stats(train: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (shape (1,)) of the training log-mels, accumulated in fp64 chunk by chunk so a large
    fp16 set is never copied to fp32 whole."""
    s = s2 = torch.zeros((), dtype=torch.float64, device=train.device)
    for i in range(0, len(train), chunk):
        x = train[i:i + chunk].double()
        s, s2 = s + x.sum(), s2 + (x * x).sum()
    n = train.numel()
    mean = s / n
    std = ((s2 - n * mean * mean) / max(1, n - 1)).clamp_min(1e-12).sqrt()
    return mean.float().view(1), std.float().view(1)


def image_modality(arrays: dict, cfg: DataConfig, device) -> ModalityData:
    tx, ty = torch.from_numpy(np.ascontiguousarray(arrays["train_x"])), torch.from_numpy(arrays["train_y"])
    keep = torch.from_numpy(stratified_subset(ty, cfg.max_train_images, cfg.build_seed))
    tx, ty = tx[keep], ty[keep]
    if len(tx) == 0 or len(arrays["test_x"]) == 0:
        raise DataError("the image dataset has an empty train or test split")
    f = tx.float() / 255
    mean, std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return ModalityData(tx.to(device), ty.to(device), torch.from_numpy(np.ascontiguousarray(arrays["test_x"])).to(device),
                        torch.from_numpy(arrays["test_y"]).to(device), list(arrays["classes"]), mean.to(device), std.to(device))


def audio_modality(arrays: dict, cfg: DataConfig, device) -> ModalityData:
    """Log-mels of both splits; the normalising mean/std come from this run's own training split (never a
    cache shared across test folds, clip lengths or seeds)."""
    if len(arrays["train_x"]) == 0 or len(arrays["test_x"]) == 0:
        raise DataError("the audio dataset has an empty train or test split")
    tr = waveforms_to_logmel(torch.from_numpy(arrays["train_x"]), cfg, device, seed=cfg.build_seed)
    te = waveforms_to_logmel(torch.from_numpy(arrays["test_x"]), cfg, device, seed=cfg.build_seed + 1)
    mean, std = logmel_stats(tr)
    g = lambda k: torch.from_numpy(arrays[k]).to(device) if k in arrays else None  # noqa: E731
    return ModalityData(tr, g("train_y"), te, g("test_y"), list(arrays["classes"]), mean, std,
                        g("train_group"), g("test_group"))
