"""The data model: the data config, one modality's tensors on the device (`ModalityData`), the log-mel front-end
that turns waveforms into 1-channel images, seeded class-stratified subsets, and the decode-once cache files.
Which datasets exist and how they are read is catalog.py; the file formats are readers.py and avfashion.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import residency
from augment import AudioAugConfig, ImageAugConfig
from modality_specs import MODALITIES
from residency import Sink, as_tensor, place
from settings import ConfigError, UserError, check_choice, check_range, expand_path


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
    download: bool = False            # fetch a missing dataset from its public archive (downloads.py; needs internet)
    residency: str = "auto"           # auto | device | host | disk: where the samples live while training (residency.py)
    device_budget_gb: float = 0.0     # auto: device memory it may plan with (0 = the free memory, measured)
    host_budget_gb: float = 0.0       # auto: host memory it may plan with (0 = MemAvailable, measured)
    image_size: int = 0               # decoded image side for folder/JPEG datasets (0 = the dataset's own, 64 otherwise)
    test_fold: int = 1                # ESC-50 (1-5) / UrbanSound8K (1-10): the official fold held out for testing
    max_bad_frac: float = 0.01        # stop when more than this fraction of files is unreadable or corrupt
    max_train_images: int = 0         # a seeded, class-stratified subset of N training images (0 = all); for short CPU runs
    max_test_images: int = 0          # the same for the test images the monitor scores (0 = all); quick checks and tests
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
        check_choice("data.residency", self.residency, ("auto", *residency.TIERS))
        check_range("data.device_budget_gb", self.device_budget_gb, lo=0.0)
        check_range("data.host_budget_gb", self.host_budget_gb, lo=0.0)
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
        check_range("data.max_test_images", self.max_test_images, lo=0)
        for k in ("knn_bank", "knn_queries", "knn_k"):
            check_range(f"data.{k}", getattr(self, k), lo=0)
        if self.hop_ms <= 0 or self.win_ms < self.hop_ms or self.win_ms > 1000:
            raise ConfigError(f"data.win_ms={self.win_ms}, data.hop_ms={self.hop_ms}: need 0 < hop_ms <= win_ms <= 1000")


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("FSSUAVL_CACHE") or Path.home() / ".cache" / "fssuavl")


def spill_path(cfg: DataConfig, *keys) -> Path:
    """The disk tier's file for one array, named by everything that shapes it (`keys`: its source cache entry,
    modality and split, and the data options), so a second run maps it instead of computing it again."""
    recipe = (keys, cfg.max_train_images, cfg.build_seed, cfg.sample_rate, cfg.clip_seconds, cfg.n_mels, cfg.win_ms,
              cfg.hop_ms, cfg.dither_db) + ((cfg.max_test_images,) if cfg.max_test_images else ())
    return cache_root(cfg) / "resident" / f"{hashlib.sha1(repr(recipe).encode()).hexdigest()[:16]}.npy"


def pick_tier(cfg: DataConfig, device, need: int) -> str:
    """data.residency for `need` bytes of samples (auto: the fastest tier that fits), said in one line."""
    tier, line = residency.choose(need, device, cfg.residency, cfg.device_budget_gb, cfg.host_budget_gb)
    print(line)
    return tier


# ----------------------------------------------------------------------------- subsets

def test_subset(y, cfg: "DataConfig") -> np.ndarray:
    """The test images kept under data.max_test_images (all by default): stratified, with a seed of its own."""
    return stratified_subset(y, cfg.max_test_images, cfg.build_seed + 1)


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
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp.npz")
    try:
        with cache_writes(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # gone, or never made (the folder could not be written)
            tmp.unlink()


@contextlib.contextmanager
def cache_writes(folder: Path):
    """A cache folder that cannot be written (read-only, full, a file in the way) is one line naming it."""
    try:
        yield
    except OSError as e:
        raise DataError(f"cannot write the data cache in {folder} ({e.strerror or e}): give a writable data.cache_dir "
                        f"(or FSSUAVL_CACHE)") from e


def read_array_dir(path: Path, warn=print, small: int = 16 << 20) -> dict | None:
    """A cache entry written by write_array_dir: every ARRAY.npy memory-mapped (arrays under `small` bytes are read
    into memory), and classes.json. None (with a message naming it) when it is missing or damaged."""
    if not (path / "classes.json").is_file():
        return None
    try:
        out = {}
        for f in sorted(path.glob("*.npy")):
            a = np.load(f, mmap_mode="r")
            out[f.stem] = np.array(a) if a.nbytes < small else a
        out["classes"] = json.loads((path / "classes.json").read_text())
        return out
    except Exception as e:  # noqa: BLE001 - numpy and json raise several types for a damaged file
        warn(f"cache {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); rebuilding it")
        return None


def write_array_dir(path: Path, arrays: dict) -> None:
    """A cache entry as a folder of uncompressed .npy files (memory-mappable: nothing is decompressed whole) plus
    classes.json, written under a temp name and renamed when complete, so an interrupted build leaves nothing that
    looks finished. A concurrent build that finished first wins (same content)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    with cache_writes(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        for k, v in arrays.items():
            if k == "classes":
                (tmp / "classes.json").write_text(json.dumps([str(c) for c in v]))
            elif isinstance(v, np.memmap) and v.nbytes:  # decoded into a file: moved, or copied a chunk at a time
                whole = np.load(v.filename, mmap_mode="r")
                if whole.shape == v.shape and whole.dtype == v.dtype:
                    v.flush()
                    os.replace(v.filename, tmp / f"{k}.npy")
                else:
                    residency.write_npy(tmp / f"{k}.npy", residency.chunks_of(v), v.shape, v.dtype)
                    residency.release_pages(v)
            else:
                np.save(tmp / f"{k}.npy", np.asarray(v), allow_pickle=False)
        if path.exists():
            shutil.rmtree(path)  # a damaged entry read_array_dir refused
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    residency: str = "device"                   # where train_x/test_x live (residency.py); the rest is on the device
    maps: tuple = ()                            # the disk tier's MappedArrays, released after every read

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "ModalityData":
        mv = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return ModalityData(**(mv | {"residency": "device", "maps": ()}))

    def take(self, split: str, rows, device) -> torch.Tensor:
        """Samples of a split on `device`: `rows` is a slice or an index tensor (on any device). The device tier
        indexes in place; host and disk gather on the host, copy, and (disk) release the mapped pages."""
        x = self.train_x if split == "train" else self.test_x
        for m in self.maps:  # a mapped file cut short since would SIGBUS on the gather: say so first
            m.check()
        if isinstance(rows, torch.Tensor) and rows.device != x.device:
            rows = rows.to(x.device)
        out = x[rows]
        if self.residency == "device":
            return out
        out = out.to(device, non_blocking=out.is_pinned(), copy=True)
        self.release()
        return out

    def release(self) -> None:
        for m in self.maps:
            m.release()

    def client_view(self, rows: torch.Tensor, device, pin: bool = False) -> "ModalityData":
        """The training samples `rows` gathered into a dataset of their own (the host and disk tiers, before a
        client trains): row i of the view is row rows[i] here, so training on the view's indices 0..n-1 reads the
        very samples (and draws the very batches) the device tier would. pin: gather into pinned host memory and
        stop there (a prefetch thread's half of the copy); `on_device` finishes it."""
        rows = rows.cpu()
        if pin:
            for m in self.maps:
                m.check()
            out = torch.empty((len(rows), *self.train_x.shape[1:]), dtype=self.train_x.dtype, pin_memory=True)
            torch.index_select(self.train_x, 0, rows, out=out)
            self.release()
        else:
            out = self.take("train", rows, device)
        return ModalityData(**(self.__dict__ | {"train_x": out, "residency": "device", "maps": ()}))

    def on_device(self, device) -> "ModalityData":
        if residency.same_device(self.train_x.device, device):
            return self
        return ModalityData(**(self.__dict__ | {"train_x": self.train_x.to(device, non_blocking=self.train_x.is_pinned())}))

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


def waveforms_to_logmel(wav, cfg: DataConfig, device, seed: int = 0, batch: int = 0, tier: str = "device",
                        spill: Optional[Path] = None):
    """int16 (N, L) waveforms (a tensor, an array or a memmap) -> float16 log-mel (N, 1, F, T) in `tier`
    (residency.py), with the configured dither added (seeded, so the features are reproducible). Computed on
    `device` a batch at a time and written straight to the tier, so the whole set is never held twice.
    Returns (tensor, MappedArray or None). The disk tier maps a finished `spill` file instead of computing it."""
    shape = (len(wav), *expected_audio_shape(cfg, wav.shape[1]))
    if tier == "disk" and spill is not None and (m := residency.reuse(spill, shape)) is not None:
        return m.tensor, m
    front = LogMel(cfg.sample_rate, cfg.n_mels, cfg.win_ms, cfg.hop_ms).to(device)
    # at most 512 clips a batch, and about 2^24 STFT values (frames x n_fft): the frames, spectrum and power of 512
    # five-second clips at n_fft 1024 would take several GB at once
    batch = batch or max(1, min(512, (1 << 24) // (shape[-1] * front.mel.spectrogram.n_fft)))
    g = torch.Generator(device=device).manual_seed(seed)
    amp = 10 ** (cfg.dither_db / 20)
    sink = Sink(tier, shape, torch.float16, device, spill)
    try:
        for i in range(0, len(wav), batch):
            x = as_tensor(wav[i:i + batch]).to(device).float() / 32768.0
            x = x + amp * torch.randn(x.shape, generator=g, device=device)
            sink.write(i, front(x).half())
            residency.release_pages(wav)
        return sink.finish()
    finally:
        sink.abort()


def expected_audio_shape(cfg: DataConfig, length: int = 0) -> tuple:
    """(1, n_mels, frames) of the configured front-end on one clip of `length` samples (0: clip_seconds), known
    before any file is read."""
    clip = torch.zeros(1, length or int(round(cfg.clip_seconds * cfg.sample_rate)))
    return tuple(LogMel(cfg.sample_rate, cfg.n_mels, cfg.win_ms, cfg.hop_ms)(clip).shape[1:])


def stat_chunk(x, cap: int = 4096, elements: int = 1 << 24) -> int:
    """Rows per chunk of a statistic in fp64: at most `cap`, and about `elements` values (128 MB) at a time."""
    return max(1, min(cap, elements // max(1, int(np.prod(x.shape[1:])))))


def logmel_stats(train: torch.Tensor, chunk: int = 0, device=None, release=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (shape (1,)) of the training log-mels, accumulated in fp64 chunk by chunk on `device` (default:
    the tensor's), so a large fp16 set is never copied to fp32 whole and every residency tier gets the same bits.
    `release` (a memory-mapped set's) is called after every chunk."""
    device = train.device if device is None else device
    chunk = chunk or stat_chunk(train)
    s = s2 = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(train), chunk):
        x = train[i:i + chunk].to(device).double()
        s, s2 = s + x.sum(), s2 + (x * x).sum()
        if release is not None:
            release()
    n = train.numel()
    mean = s / n
    std = ((s2 - n * mean * mean) / max(1, n - 1)).clamp_min(1e-12).sqrt()
    return mean.float().view(1), std.float().view(1)


def image_stats(x, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1], in fp64 a chunk at a time on
    `device` (never the whole set as float32, which is four times the images)."""
    c, chunk = x.shape[1], stat_chunk(x)
    s = s2 = torch.zeros(c, dtype=torch.float64, device=device)
    for i in range(0, len(x), chunk):
        f = as_tensor(x[i:i + chunk]).to(device).double() / 255
        s, s2 = s + f.sum(dim=(0, 2, 3)), s2 + (f * f).sum(dim=(0, 2, 3))
        residency.release_pages(x)
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s / n
    std = ((s2 - n * mean * mean) / max(1, n - 1)).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-3)


def image_modality(arrays: dict, cfg: DataConfig, device, tier: str = "device", source: str = "",
                   modality: str = "image") -> ModalityData:
    """Images in `tier`; `source` names the cache entry they came from (the disk tier's files are keyed by it and by
    `modality`: any modality whose samples are uint8 (C, H, W) arrays is built here under its own name)."""
    ty = np.asarray(arrays["train_y"])
    keep = stratified_subset(ty, cfg.max_train_images, cfg.build_seed)
    tx = arrays["train_x"] if len(keep) == len(ty) else arrays["train_x"][keep]
    if len(tx) == 0 or len(arrays["test_x"]) == 0:
        raise DataError(f"the {modality} dataset has an empty train or test split")
    mean, std = image_stats(tx, device)
    ey = np.asarray(arrays["test_y"])
    keep_te = test_subset(ey, cfg)
    ex = arrays["test_x"] if len(keep_te) == len(ey) else arrays["test_x"][keep_te]
    train_x, m1 = place(tx, tier, device, spill_path(cfg, source, modality, "train"))
    test_x, m2 = place(ex, tier, device, spill_path(cfg, source, modality, "test"))
    t = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731 - labels: small, always on the device
    return ModalityData(train_x, t(ty[keep]), test_x, t(ey[keep_te]), list(arrays["classes"]), mean, std,
                        residency=tier, maps=tuple(m for m in (m1, m2) if m))


def audio_modality(arrays: dict, cfg: DataConfig, device, tier: str = "device", source: str = "") -> ModalityData:
    """Log-mels of both splits in `tier`; the normalising mean/std come from this run's own training split (never a
    cache shared across test folds, clip lengths or seeds)."""
    if len(arrays["train_x"]) == 0 or len(arrays["test_x"]) == 0:
        raise DataError("the audio dataset has an empty train or test split")
    tr, m1 = waveforms_to_logmel(arrays["train_x"], cfg, device, seed=cfg.build_seed, tier=tier,
                                 spill=spill_path(cfg, source, "audio", "train"))
    te, m2 = waveforms_to_logmel(arrays["test_x"], cfg, device, seed=cfg.build_seed + 1, tier=tier,
                                 spill=spill_path(cfg, source, "audio", "test"))
    mean, std = logmel_stats(tr, device=device, release=m1.release if m1 else None)
    g = lambda k: torch.from_numpy(np.array(arrays[k])).to(device) if k in arrays else None  # noqa: E731
    return ModalityData(tr, g("train_y"), te, g("test_y"), list(arrays["classes"]), mean, std,
                        g("train_group"), g("test_group"), residency=tier, maps=tuple(m for m in (m1, m2) if m))


def stored_bytes(arrays: dict, cfg: DataConfig) -> int:
    """Bytes a modality's samples take when kept as they are decoded (images)."""
    n = len(arrays["train_x"]) + len(arrays["test_x"])
    return n * int(np.prod(arrays["train_x"].shape[1:])) * arrays["train_x"].dtype.itemsize


def logmel_bytes(arrays: dict, cfg: DataConfig) -> int:
    """Bytes a modality's waveforms take once converted to fp16 log-mels (audio)."""
    n = len(arrays["train_x"]) + len(arrays["test_x"])
    return n * int(np.prod(expected_audio_shape(cfg, arrays["train_x"].shape[1]))) * 2


