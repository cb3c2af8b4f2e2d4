"""Data for FSSUAVL: the offline AV-Fashion set, the log-mel front-end, batched on-device augmentations
for images and spectrograms, and client partitioning (IID, Dirichlet label skew, natural groups such as
speakers, and which clients hold which modality).

AV-Fashion (the default): real Fashion-MNIST images (Debian package dataset-fashion-mnist) and the ten
class names plus the digits "zero".."nine" spoken by the espeak-ng TTS engine with many voices (one voice
is one speaker; train and test voices are disjoint). Build it once with

    python data.py            # builds the cache and prints what it holds
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from runtime import ConfigError, UserError, check_range, expand_path

MODALITIES = ("image", "audio")
# the datasets readers.py reads from their official on-disk formats (kept here so config checks need no reader)
IMAGE_DATASETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder")
AUDIO_DATASETS = ("esc50", "speechcommands", "urbansound8k", "audiofolder", "fluidr3")
PAIRED_DATASETS = ("vggsound",)


class DataError(UserError, RuntimeError):
    """A dataset problem the user can fix (missing files or packages, unreadable data)."""


# ----------------------------------------------------------------------------- config

@dataclass
class ImageAugConfig:
    crop_scale: tuple[float, float] = (0.2, 1.0)   # random resized crop, fraction of the area
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = -1.0          # gaussian blur probability; < 0 = 0.5 for inputs >= 64 px, else 0 (SimCLR)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        _check_pair("data.image_aug.crop_scale", self.crop_scale, 0.0, 1.0)
        for k in ("flip_p", "jitter_p", "gray_p"):
            check_range(f"data.image_aug.{k}", getattr(self, k), lo=0.0, hi=1.0)


@dataclass
class AudioAugConfig:
    time_shift: float = 0.15      # max shift as a fraction of the clip
    time_stretch: float = 1.2     # stretch factor drawn log-uniformly in [1/s, s]
    freq_shift: float = 0.05      # max shift along the mel axis as a fraction of n_mels (~ pitch)
    gain_db: float = 6.0          # random gain in [-g, g] dB
    noise_p: float = 0.5          # probability of adding noise ...
    noise_snr_db: tuple[float, float] = (5.0, 30.0)  # ... at an SNR (dB below the clip's peak bin) in this range
    freq_masks: int = 2           # SpecAugment
    freq_mask_frac: float = 0.1875  # max width as a fraction of n_mels (24 of 128 bins)
    time_masks: int = 2
    time_mask_frac: float = 0.125   # max width as a fraction of frames

    def __post_init__(self):
        check_range("data.audio_aug.time_stretch", self.time_stretch, lo=1.0)
        check_range("data.audio_aug.noise_p", self.noise_p, lo=0.0, hi=1.0)
        for k in ("time_shift", "freq_shift", "freq_mask_frac", "time_mask_frac"):
            check_range(f"data.audio_aug.{k}", getattr(self, k), lo=0.0, hi=1.0)


@dataclass
class DataConfig:
    dataset: str = "avfashion"        # avfashion | vggsound (paired) | IMAGE+AUDIO, e.g. cifar10+esc50 (see readers.py)
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
        check_dataset_name(self.dataset)
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
            setattr(self, k, expand_path(getattr(self, k)))
        check_range("data.max_train_images", self.max_train_images, lo=0)
        for k in ("knn_bank", "knn_queries", "knn_k"):
            check_range(f"data.{k}", getattr(self, k), lo=0)
        if self.hop_ms <= 0 or self.win_ms < self.hop_ms or self.win_ms > 1000:
            raise ConfigError(f"data.win_ms={self.win_ms}, data.hop_ms={self.hop_ms}: need 0 < hop_ms <= win_ms <= 1000")


def check_dataset_name(name: str) -> None:
    if name in ("avfashion",) + PAIRED_DATASETS:
        return
    parts = name.split("+")
    if len(parts) != 2 or parts[0] not in IMAGE_DATASETS or parts[1] not in AUDIO_DATASETS:
        raise ConfigError(f"data.dataset={name!r}: expected avfashion, {', '.join(PAIRED_DATASETS)}, or IMAGE+AUDIO "
                          f"with IMAGE in {', '.join(IMAGE_DATASETS)} and AUDIO in {', '.join(AUDIO_DATASETS)}")


def _check_pair(key, pair, lo, hi):
    if not (lo <= pair[0] <= pair[1] <= hi) or len(pair) != 2:
        raise ConfigError(f"{key}={list(pair)}: expected [low, high] with {lo} <= low <= high <= {hi}")


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

def source_fingerprint(*paths) -> str:
    """A digest of what a cache entry was built from: every file under `paths` (files or folders) with its
    relative name, size and modification time. Editing, adding or removing a file (a labels.csv, a clip)
    changes it, so a stale cache is never reused."""
    h = hashlib.sha1()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file()) if root.is_dir() else []
        h.update(str(root.resolve()).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(root) if f != root else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
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


# ----------------------------------------------------------------------------- AV-Fashion

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
    """16-bit PCM WAV bytes -> (int16 samples, rate). Tolerates espeak-ng's streamed header, whose
    size fields are placeholders."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise DataError("not a RIFF/WAVE stream")
    pos, rate, bits = 12, None, None
    while pos + 8 <= len(raw):
        cid, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            rate = int.from_bytes(raw[pos + 12:pos + 16], "little")
            bits = int.from_bytes(raw[pos + 22:pos + 24], "little")
        if cid == b"data":
            if bits != 16:
                raise DataError(f"expected 16-bit PCM, got {bits} bits")
            body = raw[pos + 8:]
            return np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.int16), rate
        pos += 8 + size
    raise DataError("WAV stream has no data chunk")


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


# ----------------------------------------------------------------------------- loading

def load_avfashion(cfg: DataConfig, device, progress: bool = True) -> dict[str, ModalityData]:
    path = build_avfashion(cfg, progress=progress)
    z = read_npz(path)
    if z is None:
        raise DataError(f"AV-Fashion cache {path} could not be read back right after it was built: check the disk")
    out = {}
    if "image" in cfg.modalities:
        tx = torch.from_numpy(z["image_train_x"]).unsqueeze(1)
        ty = torch.from_numpy(z["image_train_y"])
        keep = torch.from_numpy(stratified_subset(ty, cfg.max_train_images, cfg.build_seed))
        tx, ty = tx[keep], ty[keep]
        mean = tx.float().mean() / 255
        std = tx.float().std() / 255
        out["image"] = ModalityData(tx.to(device), ty.to(device), torch.from_numpy(z["image_test_x"]).unsqueeze(1).to(device),
                                    torch.from_numpy(z["image_test_y"]).to(device), list(FASHION_CLASSES),
                                    mean.view(1).to(device), std.view(1).to(device))
    if "audio" in cfg.modalities:
        test = torch.from_numpy(z["test_voice"][z["audio_speaker"]])
        spec = waveforms_to_logmel(torch.from_numpy(z["audio"]), cfg, device, seed=cfg.build_seed)
        y, spk = torch.from_numpy(z["audio_y"]).to(device), torch.from_numpy(z["audio_speaker"]).to(device)
        tr, te = (~test).to(device), test.to(device)
        mean, std = logmel_stats(spec[tr])
        out["audio"] = ModalityData(spec[tr], y[tr], spec[te], y[te], list(WORDS), mean, std,
                                    spk[tr], spk[te])
    return out


# ----------------------------------------------------------------------------- augmentations

def _uniform(g, n, lo, hi, device):
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _bernoulli(g, n, p, device):
    return torch.rand(n, generator=g, device=device) < p


def _gray(x):
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale, ratio, flip_p: float) -> torch.Tensor:
    """Per-sample random resized crop and horizontal flip of float (B, C, H, W) as one batched affine
    resample: the crop's box becomes the sampling grid, so no per-sample Python loop."""
    B, dev = x.shape[0], x.device
    area = _uniform(g, B, scale[0], scale[1], dev)
    logr = _uniform(g, B, math.log(ratio[0]), math.log(ratio[1]), dev)
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(B, generator=g, device=dev) - 1)  # box centre in [-1, 1] coords
    cy = (1 - h) * (2 * torch.rand(B, generator=g, device=dev) - 1)
    flip = torch.where(_bernoulli(g, B, flip_p, dev), -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_INV = ((1.0, 0.956170685404, 0.621432566347), (1.0, -0.27268860233, -0.64681323702), (1.0, -1.103744082176, 1.700623094677))
_YIQ_CACHE: dict = {}


def _yiq(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB->YIQ and its inverse on `device`, made once: a new host tensor every step would be a blocking copy
    (and torch.linalg.inv checks its result on the host), both of which stall a CUDA stream."""
    key = (str(device), dtype)
    if key not in _YIQ_CACHE:
        _YIQ_CACHE[key] = (torch.tensor(YIQ, device=device, dtype=dtype), torch.tensor(YIQ_INV, device=device, dtype=dtype))
    return _YIQ_CACHE[key]


def color_jitter(x: torch.Tensor, g: torch.Generator, strengths, p: float) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter on float (B, C, H, W) in [0, 1],
    applied to a random p-fraction of the batch (SimCLR; fixed order b, c, s, h)."""
    B, dev = x.shape[0], x.device
    b, c, s, h = strengths
    on = _bernoulli(g, B, p, dev).view(B, 1, 1, 1)

    def factor(k):
        return _uniform(g, B, max(0.0, 1 - k), 1 + k, dev).view(B, 1, 1, 1)
    y = (x * factor(b)).clamp(0, 1)
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - m) * factor(c) + m).clamp(0, 1)
    if x.shape[1] == 3:
        gr = _gray(y)
        y = ((y - gr) * factor(s) + gr).clamp(0, 1)
        # hue: rotate the chroma plane of YIQ by a per-sample angle
        ang = _uniform(g, B, -h, h, dev) * 2 * math.pi
        yiq, yiq_inv = _yiq(dev, y.dtype)
        t = torch.einsum("ij,bjhw->bihw", yiq, y)
        cos, sin = torch.cos(ang).view(B, 1, 1), torch.sin(ang).view(B, 1, 1)
        i2 = t[:, 1] * cos - t[:, 2] * sin
        q2 = t[:, 1] * sin + t[:, 2] * cos
        t = torch.stack([t[:, 0], i2, q2], dim=1)
        y = torch.einsum("ij,bjhw->bihw", yiq_inv, t).clamp(0, 1)
    return torch.where(on, y, x)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float, sigma) -> torch.Tensor:
    """Per-sample gaussian blur (sigma ~ U(sigma)) of a random p-fraction, as one grouped separable conv."""
    B, C, H, W = x.shape
    dev = x.device
    sig = _uniform(g, B, sigma[0], sigma[1], dev)
    on = _bernoulli(g, B, p, dev)
    k = max(3, int(0.1 * min(H, W)) // 2 * 2 + 1)
    r = torch.arange(k, device=dev, dtype=x.dtype) - k // 2
    ker = torch.exp(-r.view(1, -1) ** 2 / (2 * sig.view(-1, 1) ** 2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), ker.view(B * C, 1, k, 1), groups=B * C)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), ker.view(B * C, 1, 1, k), groups=B * C)
    return torch.where(on.view(B, 1, 1, 1), y.view(B, C, H, W), x)


def augment_image(x: torch.Tensor, md: ModalityData, cfg: ImageAugConfig, g: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) on the training device -> one normalised float32 SimCLR view, with random
    parameters drawn per sample from generator `g`."""
    y = random_resized_crop(x.float() / 255.0, g, cfg.crop_scale, cfg.crop_ratio, cfg.flip_p)
    y = color_jitter(y, g, cfg.jitter, cfg.jitter_p)
    if y.shape[1] == 3 and cfg.gray_p > 0:
        gray = _bernoulli(g, y.shape[0], cfg.gray_p, y.device).view(-1, 1, 1, 1)
        y = torch.where(gray, _gray(y).expand_as(y), y)
    blur_p = cfg.blur_p if cfg.blur_p >= 0 else (0.5 if min(y.shape[-2:]) >= 64 else 0.0)
    if blur_p > 0:
        y = gaussian_blur(y, g, blur_p, cfg.blur_sigma)
    return md.standardize(y)


def augment_audio(x: torch.Tensor, md: ModalityData, cfg: AudioAugConfig, g: torch.Generator) -> torch.Tensor:
    """Raw log-mel (B, 1, F, T) on the training device -> one normalised float32 view: per-sample time
    shift + time stretch + mel shift (one affine resample), random gain, additive noise at a random SNR,
    then SpecAugment frequency and time masks."""
    x = x.float()
    B, _, Fm, T = x.shape
    dev = x.device
    stretch = torch.exp(_uniform(g, B, -math.log(cfg.time_stretch), math.log(cfg.time_stretch), dev))
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = 1.0 / stretch
    theta[:, 0, 2] = 2 * _uniform(g, B, -cfg.time_shift, cfg.time_shift, dev)
    theta[:, 1, 1] = 1.0
    theta[:, 1, 2] = 2 * _uniform(g, B, -cfg.freq_shift, cfg.freq_shift, dev)
    grid = F.affine_grid(theta, [B, 1, Fm, T], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x + (_uniform(g, B, -cfg.gain_db, cfg.gain_db, dev) * math.log(10) / 10).view(B, 1, 1, 1)
    if cfg.noise_p > 0:  # noise power: exponential per bin (|gaussian|^2), level set by a per-sample SNR
        snr = _uniform(g, B, cfg.noise_snr_db[0], cfg.noise_snr_db[1], dev) * math.log(10) / 10
        level = x.amax(dim=(1, 2, 3)) - snr
        u = torch.rand(x.shape, generator=g, device=dev).clamp_min(1e-12)
        noisy = torch.logaddexp(x, level.view(B, 1, 1, 1) + torch.log(-torch.log(u)))
        x = torch.where(_bernoulli(g, B, cfg.noise_p, dev).view(B, 1, 1, 1), noisy, x)
    x = md.standardize(x)
    keep = torch.ones(B, 1, Fm, T, device=dev, dtype=torch.bool)
    for n, size, axis in ((cfg.freq_masks, Fm, 2), (cfg.time_masks, T, 3)):
        frac = cfg.freq_mask_frac if axis == 2 else cfg.time_mask_frac
        for _ in range(n):
            width = (torch.rand(B, generator=g, device=dev) * (frac * size + 1)).floor()
            start = (torch.rand(B, generator=g, device=dev) * (size - width + 1)).floor()
            idx = torch.arange(size, device=dev).view(1, -1)
            band = (idx >= start.view(-1, 1)) & (idx < (start + width).view(-1, 1))  # (B, size)
            keep &= ~(band.view(B, 1, -1, 1) if axis == 2 else band.view(B, 1, 1, -1))
    return x * keep


def augment(modality: str, x: torch.Tensor, md: ModalityData, cfg: DataConfig, g: torch.Generator) -> torch.Tensor:
    if modality == "image":
        return augment_image(x, md, cfg.image_aug, g)
    return augment_audio(x, md, cfg.audio_aug, g)


# ----------------------------------------------------------------------------- partitioning

def iid_partition(n: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(n), n_clients)]


def dirichlet_partition(labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator,
                        min_size: int = 2, max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: for each class, split its samples over clients in proportions ~ Dir(alpha), redrawn
    until every client holds at least `min_size` samples (the NIID-Bench recipe)."""
    labels = np.asarray(labels)
    if n_clients * min_size > len(labels):
        raise ConfigError(f"cannot give {n_clients} clients at least {min_size} samples each from "
                          f"{len(labels)} samples: use fewer clients (fed.clients)")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.nonzero(labels == c)[0])
            prop = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(prop)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ConfigError(f"Dirichlet(alpha={alpha}) could not give all {n_clients} clients {min_size} samples "
                      f"in {max_tries} draws: raise fed.alpha or lower fed.clients")


def pathological_partition(labels: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: sort by label, cut into n_clients * k shards, give
    every client k random shards (so about k classes each)."""
    labels = np.asarray(labels)
    if n_clients * k > len(labels):
        raise ConfigError(f"cannot cut {len(labels)} samples into {n_clients} x {k} shards: lower fed.clients "
                          f"or fed.classes_per_client")
    order = np.argsort(labels + rng.random(len(labels)) * 0.5, kind="stable")  # by label, shuffled inside
    shards = np.array_split(order, n_clients * k)
    perm = rng.permutation(len(shards))
    return [np.sort(np.concatenate([shards[j] for j in perm[i * k:(i + 1) * k]])) for i in range(n_clients)]


def group_partition(groups: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Natural partition: whole groups (speakers, folds, kits) go to clients, as evenly as possible."""
    groups = np.asarray(groups)
    uniq = rng.permutation(np.unique(groups))
    if len(uniq) < n_clients:
        raise ConfigError(f"the data has {len(uniq)} speakers/groups, fewer than the {n_clients} clients "
                          f"that hold this modality: use fewer clients or another fed.partition")
    owner = {g: k % n_clients for k, g in enumerate(uniq)}
    client = np.array([owner[g] for g in groups])
    return [np.nonzero(client == k)[0] for k in range(n_clients)]


def assign_modalities(n_clients: int, modalities: tuple[str, ...], fractions: tuple[float, float, float],
                      rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Which modalities each client holds. With both modalities enabled, `fractions` = (image only,
    audio only, both) of the clients (rounded, every kind with a positive fraction gets at least one
    client); with one modality every client holds it."""
    if len(modalities) == 1:
        return [tuple(modalities)] * n_clients
    kinds = [("image",), ("audio",), ("image", "audio")]
    counts = np.floor(np.asarray(fractions) / sum(fractions) * n_clients).astype(int)
    counts = np.maximum(counts, (np.asarray(fractions) > 0).astype(int))
    while counts.sum() > n_clients:
        counts[np.argmax(counts)] -= 1
    while counts.sum() < n_clients:
        counts[np.argmax(np.asarray(fractions) * n_clients - counts)] += 1
    held = [k for k, c in zip(kinds, counts) for _ in range(c)]
    return [held[i] for i in rng.permutation(n_clients)]


def partition(data: dict[str, ModalityData], n_clients: int, scheme: str, alpha: float,
              fractions: tuple[float, float, float], seed: int, min_size: int = 2,
              classes_per_client: int = 2, federation: tuple[str, ...] | None = None) -> list[dict[str, np.ndarray]]:
    """Client k's data: {modality: indices into data[modality].train_x}. Each modality is split only
    over the clients that hold it; unpaired by construction (image and audio indices are independent).
    scheme: iid | dirichlet | pathological (k classes per client) | natural (whole speakers/folds/kits
    per client where the data has such ids, Dirichlet otherwise).

    federation: the modalities the clients hold (default: those in `data`). Which client holds what is
    drawn over the federation's modalities, and each modality is split with its own random stream, so a
    run on a subset of them (an image-only baseline of an image+audio federation) gets exactly the same
    clients and indices for the modalities it keeps."""
    federation = tuple(federation or data)
    if set(data) - set(federation):
        raise ValueError(f"data holds {sorted(data)}, not all in the federation's modalities {federation}")
    holds = assign_modalities(n_clients, federation, fractions, np.random.default_rng([seed, 0]))
    clients = [dict() for _ in range(n_clients)]
    for m, md in data.items():
        rng = np.random.default_rng([seed, 1 + MODALITIES.index(m)])
        owners = [k for k in range(n_clients) if m in holds[k]]
        labels = md.train_y.cpu().numpy()
        if len(owners) * min_size > len(labels):
            raise ConfigError(f"cannot give {len(owners)} clients at least {min_size} {m} samples each from "
                              f"{len(labels)} samples: use fewer clients (fed.clients)")
        if scheme == "iid":
            parts = iid_partition(len(labels), len(owners), rng)
        elif scheme == "natural" and md.train_group is not None:
            parts = group_partition(md.train_group.cpu().numpy(), len(owners), rng)
        elif scheme == "pathological":
            parts = pathological_partition(labels, len(owners), classes_per_client, rng)
        else:
            parts = dirichlet_partition(labels, len(owners), alpha, rng, min_size)
        for k, idx in zip(owners, parts):
            clients[k][m] = idx
    return clients


def describe_partition(clients: list[dict[str, np.ndarray]], data: dict[str, ModalityData]) -> str:
    """Per-client sample counts per modality and class, as a text table."""
    lines = []
    for m, md in data.items():
        y = md.train_y.cpu().numpy()
        ncls = len(md.classes)
        lines.append(f"{m}: client | n | per-class counts ({ncls} classes)")
        for k, c in enumerate(clients):
            if m in c:
                counts = np.bincount(y[c[m]], minlength=ncls)
                lines.append(f"  {k:4d} | {len(c[m]):6d} | {' '.join(f'{v:4d}' for v in counts)}")
    return "\n".join(lines)


if __name__ == "__main__":
    cfg = DataConfig()
    p = build_avfashion(cfg)
    z = np.load(p)
    print(f"AV-Fashion cache: {p}")
    print(f"images: {z['image_train_x'].shape[0]} train, {z['image_test_x'].shape[0]} test; "
          f"audio: {len(z['audio'])} clips of {len(WORDS)} words from {len(z['voices'])} voices "
          f"({int(z['test_voice'].sum())} held out)")
    sys.exit(0)
