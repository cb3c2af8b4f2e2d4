"""Tiny datasets written in each dataset's official on-disk format, for the loader tests and dry runs."""
import csv
import pickle
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

RNG = np.random.default_rng(0)


def noise_wav(path: Path, seconds: float = 0.3, rate: int = 16000, subtype: str = "PCM_16", channels: int = 1):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (0.1 * RNG.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    sf.write(str(path), x, rate, subtype=subtype)


def jpeg(path: Path, size: int = 64, mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    im.save(path, format="PNG" if mode == "RGBA" or path.suffix == ".png" else "JPEG")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             b"labels": [i % 10 for i in range(per_batch)], b"batch_label": name.encode()}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return root


def write_cifar100(root: Path, n: int = 200) -> Path:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name in ("train", "test"):
        d = {b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 100 for i in range(n)],
             b"coarse_labels": [i % 20 for i in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"g{i}".encode() for i in range(20)]}, f)
    return root


def write_stl10(root: Path, n: int = 10) -> np.ndarray:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    imgs = RNG.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W) as a user sees them
    for split in ("train", "test"):
        imgs.transpose(0, 1, 3, 2).tofile(base / f"{split}_X.bin")  # the official files are column-major
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(base / f"{split}_y.bin")
    (base / "class_names.txt").write_text("\n".join(f"s{i}" for i in range(10)))
    return imgs


def write_tinyimagenet(root: Path, wnids=("n01", "n02", "n03"), per_class: int = 4) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}, other name\n" for w in wnids) + "n99\tunused\n")
    for w in wnids:
        for i in range(per_class):
            jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG")
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i in range(2 * len(wnids)):
        name = f"val_{i}.JPEG"
        jpeg(base / "val" / "images" / name)
        lines.append(f"{name}\t{wnids[i % len(wnids)]}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def write_imagefolder(root: Path) -> Path:
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(3):
                jpeg(root / split / c / f"{i}.jpg", size=40 + 8 * i)
    jpeg(root / "train" / "cat" / "gray.png", mode="L")
    jpeg(root / "train" / "dog" / "alpha.png", mode="RGBA")
    return root


def write_esc50(root: Path, per_fold: int = 4, rate: int = 44100) -> Path:
    rows = []
    for fold in range(1, 6):
        for i in range(per_fold):
            target = (fold * per_fold + i) % 5
            fn = f"{fold}-{1000 + i}-A-{target}.wav"
            noise_wav(root / "audio" / fn, seconds=0.5, rate=rate)
            rows.append({"filename": fn, "fold": fold, "target": target, "category": f"cat{target}",
                         "esc10": "False", "src_file": 1000 + i, "take": "A"})
    write_csv(root / "meta" / "esc50.csv", rows)
    return root


def write_speechcommands(root: Path, words=("yes", "no", "up"), speakers=("aa11", "bb22", "cc33", "dd44")) -> Path:
    test, val = [], []
    for w in words:
        for j, spk in enumerate(speakers):
            rel = f"{w}/{spk}_nohash_0.wav"
            noise_wav(root / rel, seconds=1.0)
            (test if j == 0 else val if j == 1 else []).append(rel)
    noise_wav(root / "_background_noise_" / "white_noise.wav", seconds=2.0)
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    return root


def write_urbansound8k(root: Path, per_fold: int = 2) -> Path:
    rows = []
    for fold in range(1, 11):
        for i in range(per_fold):
            cid = (fold + i) % 10
            fn = f"{100 + fold}-{cid}-0-{i}.wav"
            noise_wav(root / "audio" / f"fold{fold}" / fn, seconds=0.4, rate=22050, channels=2)
            rows.append({"slice_file_name": fn, "fsID": 100 + fold, "start": 0, "end": 0.4, "salience": 1,
                         "fold": fold, "classID": cid, "class": f"class{cid}"})
    write_csv(root / "metadata" / "UrbanSound8K.csv", rows)
    return root


def write_audiofolder(root: Path) -> Path:
    rows = []
    for i in range(8):
        fn = f"clips/{i}.flac"
        noise_wav(root / fn, seconds=0.3)
        rows.append({"file": fn, "label": "a" if i % 2 else "b", "split": "test" if i < 2 else "train"})
    write_csv(root / "labels.csv", rows)
    return root


def write_vggsound(root: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        ytid, start = f"vid{i:03d}", 30 * i
        cid = f"{ytid}_{start:06d}"
        jpeg(root / "frames" / f"{cid}.jpg", size=80)
        noise_wav(root / "audio" / f"{cid}{'.flac' if i % 2 else '.wav'}", seconds=0.5)
        rows.append([ytid, start, f"label {i % 3}", "test" if i % 4 == 0 else "train"])
    with open(root / "vggsound.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root
