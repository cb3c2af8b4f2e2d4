"""Readers of the paper datasets' official on-disk formats and splits: CIFAR-10/100 pickle batches, STL-10
binaries, Tiny-ImageNet and ImageFolder trees, ESC-50 / UrbanSound8K folds, SpeechCommands lists, a folder of audio
files with labels.csv, VGGSound frames + clips (FluidR3 notes are rendered by fluidr3.py). Each returns numpy arrays;
which dataset uses which reader (and its layout and download) is the table in catalog.py.

Files are decoded once into a versioned cache (uint8 images, int16 waveforms at the configured rate and length; a
folder of .npy files, decoded straight into them), so runs never re-decode. Unreadable, empty or NaN audio and corrupt images are skipped with a warning naming the
file and a count at the end; above data.max_bad_frac the load stops with an error.
"""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from data import DataConfig, DataError, MissingData, cache_root, read_array_dir, source_fingerprint, write_array_dir
from residency import release_pages

CACHE_VERSION = 2  # 2: a folder of .npy files (memory-mappable), was one .npz
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
FLUIDR3_SF2 = "/usr/share/sounds/sf2/FluidR3_GM.sf2"  # the Debian package fluid-soundfont-gm (fluidr3.py renders it)

def default_root(name: str) -> Path:
    if name == "fluidr3":
        return Path(FLUIDR3_SF2)
    return Path(os.environ.get("FSSUAVL_DATA", Path.home() / "data")) / name


# ----------------------------------------------------------------------------- bad files

@dataclass
class BadFiles:
    """Files skipped while decoding: warned one by one (the first few), counted, and fatal above a fraction."""
    name: str
    max_frac: float
    bad: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)
    spill: Optional[Path] = None  # the folder of the cache entry being built: large decoded arrays go to files there

    def skip(self, path, reason: str) -> None:
        self.bad.append((str(path), reason))
        if len(self.bad) <= 10:
            warnings.warn(f"{self.name}: skipping {path}: {reason}", stacklevel=2)

    def note(self, text: str) -> None:
        self.notes[text] = self.notes.get(text, 0) + 1

    def finish(self, total: int) -> None:
        for text, n in self.notes.items():
            print(f"{self.name}: {n} file(s) {text}")
        if self.bad:
            print(f"{self.name}: skipped {len(self.bad)} of {total} files (unreadable, empty or corrupt)")
        if total and len(self.bad) / total > self.max_frac:
            raise DataError(f"{self.name}: {len(self.bad)} of {total} files are unreadable or corrupt "
                            f"(more than data.max_bad_frac={self.max_frac}); first: {self.bad[0][0]} ({self.bad[0][1]})")


# ----------------------------------------------------------------------------- file I/O

def read_audio(path, sample_rate: int, length: int, bad: BadFiles) -> Optional[np.ndarray]:
    """One audio file -> int16 mono (length,) at sample_rate, centred (padded or cropped); None when the
    file is unreadable, empty or holds NaN/Inf samples (recorded in `bad`). Another rate is resampled."""
    import soundfile as sf
    try:
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for broken files
        bad.skip(path, f"unreadable ({type(e).__name__}: {str(e)[:120]})")
        return None
    if x.size == 0:
        bad.skip(path, "empty (no samples)")
        return None
    if not np.isfinite(x).all():
        bad.skip(path, "NaN/Inf samples")
        return None
    x = x.mean(axis=1)
    if rate != sample_rate:
        import torchaudio.functional as AF
        x = AF.resample(torch.from_numpy(x), rate, sample_rate).numpy()
        bad.note(f"resampled from {rate} Hz to {sample_rate} Hz")
    out = np.zeros(length, dtype=np.float32)
    if len(x) >= length:
        s = (len(x) - length) // 2
        out[:] = x[s:s + length]
    else:
        s = (length - len(x)) // 2
        out[s:s + len(x)] = x
    return (np.clip(out, -1.0, 1.0) * 32767).round().astype(np.int16)


def read_image(path, size: int, bad: BadFiles, mode: str = "RGB") -> Optional[np.ndarray]:
    """One image file -> uint8 (3, size, size) RGB (mode "L": (1, size, size) grayscale): other modes are converted
    (noted), other sizes resized on the shorter side and centre-cropped; None when corrupt."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != mode:
                bad.note(f"converted from {im.mode} to {mode}")
                im = im.convert(mode)
            if im.size != (size, size):
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            x = np.asarray(im, dtype=np.uint8)
            return (x[None] if x.ndim == 2 else x.transpose(2, 0, 1)).copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        bad.skip(path, f"corrupt image ({type(e).__name__}: {str(e)[:120]})")
        return None


def decode_all(fn: Callable, items: list, workers: int = 0) -> list:
    workers = workers or min(8, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def decode_into(fn: Callable, items: list, shapes: list[tuple], dtypes: list, workers: int = 0,
                spill: Optional[Path] = None):
    """Decode every item straight into preallocated arrays, one per output of fn(item) -> tuple of rows (or None
    for a bad item): never a list of decoded samples and then a stacked copy (twice the data). A large array is a
    file in `spill` (the cache entry being built; BadFiles.spill) when given. Returns the arrays holding the good
    items in order, compacted in place, and the keep mask."""
    outs = [_allocate((len(items), *sh), np.dtype(dt), spill) for sh, dt in zip(shapes, dtypes)]
    keep = np.zeros(len(items), dtype=bool)

    def one(i):
        rows = fn(items[i])
        if rows is not None:
            for out, r in zip(outs, rows):
                out[i] = r
            keep[i] = True
    row = sum(int(np.prod(sh)) * np.dtype(dt).itemsize for sh, dt in zip(shapes, dtypes))
    block = max(64, (128 << 20) // max(1, row))  # about 128 MB of samples a block: then a file's pages are released
    for start in range(0, len(items), block):
        decode_all(one, range(start, min(start + block, len(items))), workers)
        for out in outs:
            release_pages(out)
    j = 0
    for i in np.flatnonzero(keep):
        if i != j:
            for out in outs:
                out[j] = out[i]
        j += 1
    return [out[:j] for out in outs], keep


FILE_BACKED_BYTES = 64 << 20  # decoded arrays at least this large are files, not memory


def _allocate(shape: tuple, dtype: np.dtype, spill: Optional[Path]) -> np.ndarray:
    """Memory for decoded samples: a .npy file in `spill` (the cache entry being built) when it is large (the decoded
    data then never has to fit in RAM), else plain memory."""
    if spill is None or int(np.prod(shape)) * dtype.itemsize < FILE_BACKED_BYTES:
        return np.empty(shape, dtype=dtype)
    return np.lib.format.open_memmap(spill / f"decode-{os.urandom(6).hex()}.npy", mode="w+", dtype=dtype, shape=shape)


# ----------------------------------------------------------------------------- image datasets
# each returns dict(train_x (N,3,H,W) uint8, train_y, test_x, test_y, classes)

def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # the official CIFAR format is a Python pickle


def read_cifar(root: Path, n_classes: int, cfg: DataConfig, bad: BadFiles) -> dict:
    name = "cifar10" if n_classes == 10 else "cifar100"
    sub = "cifar-10-batches-py" if n_classes == 10 else "cifar-100-python"
    base = root / sub if (root / sub).is_dir() else root
    if n_classes == 10:
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        label_key, meta_file, names_key = b"labels", "batches.meta", b"label_names"
    else:
        train_files, test_files = ["train"], ["test"]
        label_key, meta_file, names_key = b"fine_labels", "meta", b"fine_label_names"
    for f in train_files + test_files + [meta_file]:
        if not (base / f).is_file():
            raise MissingData(name, root, f)

    def load(files):
        xs, ys = [], []
        for f in files:
            d = _unpickle(base / f)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)
    tx, ty = load(train_files)
    ex, ey = load(test_files)
    classes = [c.decode() for c in _unpickle(base / meta_file)[names_key]]
    return {"train_x": tx, "train_y": ty, "test_x": ex, "test_y": ey, "classes": classes}


def read_stl10(root: Path, cfg: DataConfig, bad: BadFiles) -> dict:
    base = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    out = {}
    for split in ("train", "test"):
        xf, yf = base / f"{split}_X.bin", base / f"{split}_y.bin"
        if not xf.is_file() or not yf.is_file():
            raise MissingData("stl10", root, f"{split}_X.bin / {split}_y.bin")
        x = np.fromfile(xf, dtype=np.uint8)
        if x.size % (3 * 96 * 96):
            raise DataError(f"stl10: {xf} has {x.size} bytes, not a multiple of 3x96x96 (truncated?)")
        out[f"{split}_x"] = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy()  # stored column-major
        out[f"{split}_y"] = np.fromfile(yf, dtype=np.uint8).astype(np.int64) - 1  # labels are 1..10
        if len(out[f"{split}_y"]) != len(out[f"{split}_x"]):
            raise DataError(f"stl10: {xf} holds {len(out[f'{split}_x'])} images but {yf} {len(out[f'{split}_y'])} labels")
    names = base / "class_names.txt"
    out["classes"] = names.read_text().split() if names.is_file() else [str(i) for i in range(10)]
    return out


def _decode_images(paths: list[Path], size: int, bad: BadFiles) -> tuple[np.ndarray, np.ndarray]:
    def one(p):
        im = read_image(p, size, bad)
        return None if im is None else (im,)
    (x,), keep = decode_into(one, paths, [(3, size, size)], [np.uint8], spill=bad.spill)
    return x, keep


def read_tinyimagenet(root: Path, cfg: DataConfig, bad: BadFiles) -> dict:
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    if not (base / "wnids.txt").is_file():
        raise MissingData("tinyimagenet", root, "wnids.txt")
    wnids = (base / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (base / "words.txt").is_file():
        for ln in (base / "words.txt").read_text().splitlines():
            if "\t" in ln:
                w, names = ln.split("\t", 1)
                words[w] = names.split(",")[0].strip()
    train = [(p, index[w]) for w in wnids for p in sorted((base / "train" / w / "images").glob("*"))
             if p.suffix.lower() in IMAGE_EXTS]
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise MissingData("tinyimagenet", root, "val/val_annotations.txt")
    val = []
    for ln in ann.read_text().splitlines():
        parts = ln.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            val.append((base / "val" / "images" / parts[0], index[parts[1]]))
    if not train:
        raise MissingData("tinyimagenet", root, "train/WNID/images/*.JPEG")
    size = cfg.image_size or 64
    tx, tk = _decode_images([p for p, _ in train], size, bad)
    ex, ek = _decode_images([p for p, _ in val], size, bad)
    return {"train_x": tx, "train_y": np.array([y for _, y in train])[tk], "test_x": ex,
            "test_y": np.array([y for _, y in val], dtype=np.int64)[ek], "classes": [words.get(w, w) for w in wnids]}


def read_imagefolder(root: Path, cfg: DataConfig, bad: BadFiles) -> dict:
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise MissingData("imagefolder", root, "train/ and val/ (or test/) folders")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}

    def listing(d):
        return [(p, index[c.name]) for c in sorted(d.iterdir()) if c.is_dir() and c.name in index
                for p in sorted(c.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    train, test = listing(root / "train"), listing(test_dir)
    size = cfg.image_size or 64
    tx, tk = _decode_images([p for p, _ in train], size, bad)
    ex, ek = _decode_images([p for p, _ in test], size, bad)
    return {"train_x": tx, "train_y": np.array([y for _, y in train], dtype=np.int64)[tk], "test_x": ex,
            "test_y": np.array([y for _, y in test], dtype=np.int64)[ek], "classes": classes}


# ----------------------------------------------------------------------------- audio datasets
# each returns a list of (path, label, group, is_test) and the class names; decoding is shared

def list_esc50(root: Path, cfg: DataConfig):
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise MissingData("esc50", root, "meta/esc50.csv")
    rows = list(csv.DictReader(open(meta, newline="")))
    if cfg.test_fold not in {int(r["fold"]) for r in rows}:
        raise DataError(f"esc50: data.test_fold={cfg.test_fold} is not one of the official folds 1-5")
    names = {int(r["target"]): r["category"] for r in rows}
    items = [(root / "audio" / r["filename"], int(r["target"]), r.get("src_file", r["filename"]),
              int(r["fold"]) == cfg.test_fold) for r in rows]
    return items, [names[i] for i in sorted(names)]


def list_speechcommands(root: Path, cfg: DataConfig):
    for f in ("validation_list.txt", "testing_list.txt"):
        if not (root / f).is_file():
            raise MissingData("speechcommands", root, f)
    test = set((root / "testing_list.txt").read_text().split())
    val = set((root / "validation_list.txt").read_text().split())
    words = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
    items = []
    for i, w in enumerate(words):
        for p in sorted((root / w).glob("*.wav")):
            rel = f"{w}/{p.name}"
            if rel in val:
                continue  # the official validation split is neither pretraining nor test data
            items.append((p, i, p.name.split("_nohash_")[0], rel in test))
    return items, words


def list_urbansound8k(root: Path, cfg: DataConfig):
    meta = root / "metadata" / "UrbanSound8K.csv"
    if not meta.is_file():
        raise MissingData("urbansound8k", root, "metadata/UrbanSound8K.csv")
    rows = list(csv.DictReader(open(meta, newline="")))
    if not 1 <= cfg.test_fold <= 10:
        raise DataError(f"urbansound8k: data.test_fold={cfg.test_fold} is not one of the official folds 1-10")
    names = {int(r["classID"]): r["class"] for r in rows}
    items = [(root / "audio" / f"fold{r['fold']}" / r["slice_file_name"], int(r["classID"]), r["fsID"],
              int(r["fold"]) == cfg.test_fold) for r in rows]
    return items, [names[i] for i in sorted(names)]


def list_audiofolder(root: Path, cfg: DataConfig):
    meta = root / "labels.csv"
    if not meta.is_file():
        raise MissingData("audiofolder", root, "labels.csv")
    try:
        rows = list(csv.DictReader(meta.read_text(encoding="utf-8").splitlines()))
    except UnicodeDecodeError as e:
        raise DataError(f"audiofolder: {meta} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise DataError(f"audiofolder: {meta} needs a header with at least the columns file,label")
    for line, r in enumerate(rows, start=2):
        if not (r.get("label") or "").strip() or not (r.get("file") or "").strip():
            raise DataError(f"audiofolder: {meta} line {line}: empty {'label' if (r.get('file') or '').strip() else 'file'} "
                            f"({r}); every row needs a file and a label")
    for r in rows:  # "class0 " and "class0" are one class; a file name's stray spaces are not part of it
        r["label"], r["file"] = r["label"].strip(), r["file"].strip()
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(cfg.build_seed)
    items = []
    for r in rows:
        is_test = r["split"].strip().lower() == "test" if "split" in r and r["split"] else rng.random() < 0.2
        items.append((root / r["file"], index[r["label"]], r.get("group") or r["file"], is_test))
    return items, classes


def audio_files(lister: Callable) -> Callable:
    """A reader (root, cfg, bad) -> arrays for a dataset of audio files that `lister` (root, cfg) -> (items,
    classes) enumerates as (path, label, group, is_test)."""
    return lambda root, cfg, bad: decode_audio(bad.name, lister, root, cfg, bad)


def decode_audio(name: str, lister: Callable, root: Path, cfg: DataConfig, bad: BadFiles) -> dict:
    if not root.exists():
        raise MissingData(name, root, "the dataset folder")
    items, classes = lister(root, cfg)
    if not items:
        raise MissingData(name, root, "audio files")
    length = int(round(cfg.clip_seconds * cfg.sample_rate))
    out = {}
    for split, test in (("train", False), ("test", True)):  # each split decoded into its own array: no split copy
        its = [it for it in items if bool(it[3]) == test]

        def one(it):
            w = read_audio(it[0], cfg.sample_rate, length, bad)
            return None if w is None else (w,)
        (x,), keep = decode_into(one, its, [(length,)], [np.int16], spill=bad.spill)
        kept = [it for it, k in zip(its, keep) if k]
        out[f"{split}_x"], out[f"{split}_y"] = x, np.array([it[1] for it in kept], dtype=np.int64)
        out[f"{split}_group"] = [str(it[2]) for it in kept]
    if not len(out["train_x"]) + len(out["test_x"]):
        raise DataError(f"{name}: none of the {len(items)} audio files under {root} could be read")
    gnames = {g: i for i, g in enumerate(sorted(set(out["train_group"]) | set(out["test_group"])))}
    for split in ("train", "test"):
        out[f"{split}_group"] = np.array([gnames[g] for g in out[f"{split}_group"]], dtype=np.int64)
    bad.finish(len(items))
    return out | {"classes": classes}


def read_vggsound(root: Path, cfg: DataConfig, bad: BadFiles) -> tuple[dict, dict]:
    """VGGSound layout: vggsound.csv rows (youtube_id, start_seconds, label, split) without a header; clip
    id YTID_START (start zero-padded to 6 digits); frames/ID.jpg and audio/ID.wav|flac. A clip missing
    either file, or with a corrupt one, is skipped; image and audio arrays stay aligned clip by clip."""
    meta = root / "vggsound.csv"
    if not meta.is_file():
        raise MissingData("vggsound", root, "vggsound.csv")
    rows = [r for r in csv.reader(open(meta, newline="")) if len(r) >= 4]
    classes = sorted({r[2].strip() for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    size, length = cfg.image_size or 64, int(round(cfg.clip_seconds * cfg.sample_rate))

    def one(r):
        cid = f"{r[0].strip()}_{int(float(r[1])):06d}"
        frame = root / "frames" / f"{cid}.jpg"
        audio = next((root / "audio" / f"{cid}{e}" for e in (".wav", ".flac") if (root / "audio" / f"{cid}{e}").is_file()), None)
        if not frame.is_file() or audio is None:
            bad.skip(root / "frames" / cid, "frame or audio file missing")
            return None
        im, wav = read_image(frame, size, bad), read_audio(audio, cfg.sample_rate, length, bad)
        return None if im is None or wav is None else (im, wav)
    image, audio = {"classes": classes}, {"classes": classes}
    n = 0
    for split in ("train", "test"):  # each split decoded into its own arrays: no split copy
        its = [r for r in rows if (r[3].strip().lower() == "test") == (split == "test")]
        (ims, wavs), keep = decode_into(one, its, [(3, size, size), (length,)], [np.uint8, np.int16], spill=bad.spill)
        y = np.array([index[r[2].strip()] for r in its], dtype=np.int64)[keep]
        image |= {f"{split}_x": ims, f"{split}_y": y}
        audio |= {f"{split}_x": wavs, f"{split}_y": y, f"{split}_group": np.arange(n, n + len(y))}
        n += len(y)
    bad.finish(len(rows))
    if not n:
        raise DataError(f"vggsound: no usable clip under {root}")
    return image, audio


# ----------------------------------------------------------------------------- cache and conversion

def cached(kind: str, name: str, root: Path, cfg: DataConfig, params: dict, build: Callable[[BadFiles], dict]) -> dict:
    """Decode once: arrays are kept in a folder of .npy files under the cache root (memory-mapped when read, so a
    large entry is never loaded whole), keyed by dataset, the parameters that shape the arrays and the content they
    were built from (every file under root with its size and mtime), so an edited labels.csv or an added clip builds
    a new entry. A damaged entry is named and rebuilt. The entry's path is returned under "source"."""
    key = hashlib.sha1(repr((CACHE_VERSION, kind, name, source_fingerprint(root), sorted(params.items()))).encode()).hexdigest()[:12]
    path = cache_root(cfg) / f"{name}-{kind}-v{CACHE_VERSION}-{key}"
    out = read_array_dir(path)
    if out is None:
        cache_root(cfg).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=cache_root(cfg)))
        try:
            arrays = build(BadFiles(name, cfg.max_bad_frac, spill=work))
            write_array_dir(path, arrays)
            del arrays  # the decoded copy: what follows reads the memory-mapped files
        finally:
            shutil.rmtree(work, ignore_errors=True)
        out = read_array_dir(path)
        if out is None:
            raise DataError(f"{name}: cache entry {path} could not be read back right after it was built: check the disk")
    return out | {"source": str(path)}


def torchvision_download(name: str) -> Callable:
    """A downloader (root) -> None for a dataset torchvision fetches (needs internet)."""
    def fetch(root: Path) -> None:
        import torchvision
        if name == "stl10":
            torchvision.datasets.STL10(str(root), split="train", download=True)
        else:
            {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name](
                str(root), train=True, download=True)
    return fetch
