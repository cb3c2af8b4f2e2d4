"""Full-size stand-ins of the paper datasets, in each one's official on-disk format, for rehearsing the paper configs
without the real data (scripts/rehearse.py). Seeded noise: the content does not change what a run costs (noise JPEGs
compress worse than photographs, so decoding them is, if anything, slower).

    python scripts/standins.py ~/standins                          # cifar10 esc50 tinyimagenet speechcommands
    python scripts/standins.py ~/standins --only vggsound --scale 0.1

Sizes at --scale 1 (the official counts): CIFAR-10 50 000 + 10 000 images (python batches); ESC-50 2 000 clips of
5 s at 44.1 kHz in 5 folds (meta/esc50.csv); Tiny-ImageNet 200 classes x 500 JPEGs + 10 000 validation JPEGs;
SpeechCommands v2 105 829 one-second clips of 35 words with the official list files; VGGSound 199 176 clips (309
classes; a 224 px frame and a 5 s 16 kHz clip each) and vggsound.csv. A finished dataset is skipped on a second run.
"""
from __future__ import annotations

import argparse
import csv
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SPEECH_WORDS = ["backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
                "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
                "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero"]


def _pool(fn, items, workers=8):
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):
            pass


def _wav(path: Path, seconds: float, rate: int, seed: int) -> None:
    import soundfile as sf
    rng = np.random.default_rng(seed)
    sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate, subtype="PCM_16")


def _jpeg(path: Path, size: int, seed: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="JPEG", quality=75)


def cifar10(root: Path, scale: float, seed: int) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = max(10, int(10000 * scale))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": n}, f)


def esc50(root: Path, scale: float, seed: int) -> None:
    per_class = max(5, int(40 * scale))  # 8 per class per fold at scale 1
    rows, jobs = [], []
    for target in range(50):
        for i in range(per_class):
            fold = i % 5 + 1
            fn = f"{fold}-{100000 + target * 1000 + i}-A-{target}.wav"
            rows.append({"filename": fn, "fold": fold, "target": target, "category": f"category{target}",
                         "esc10": "False", "src_file": 100000 + target * 1000 + i, "take": "A"})
            jobs.append((root / "audio" / fn, len(jobs)))
    (root / "audio").mkdir(parents=True, exist_ok=True)
    _pool(lambda j: _wav(j[0], 5.0, 44100, seed + j[1]), jobs)
    (root / "meta").mkdir(exist_ok=True)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def speechcommands(root: Path, scale: float, seed: int) -> None:
    total = max(len(SPEECH_WORDS) * 10, int(105829 * scale))
    jobs, test, val = [], [], []
    for i in range(total):
        word = SPEECH_WORDS[i % len(SPEECH_WORDS)]
        rel = f"{word}/{i // 5:08x}_nohash_{i % 5}.wav"
        jobs.append((root / rel, i))
        bucket = (i // 5) % 10  # a speaker's clips share a list, as in the official hash split
        (test if bucket == 0 else val if bucket == 1 else []).append(rel)
    for w in SPEECH_WORDS:
        (root / w).mkdir(parents=True, exist_ok=True)
    (root / "_background_noise_").mkdir(exist_ok=True)
    _pool(lambda j: _wav(j[0], 1.0, 16000, seed + j[1]), jobs)
    for k in range(6):
        _wav(root / "_background_noise_" / f"noise{k}.wav", 60.0, 16000, seed + 10**9 + k)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")


def tinyimagenet(root: Path, scale: float, seed: int) -> None:
    base = root / "tiny-imagenet-200"
    wnids = [f"n{10000000 + i:08d}" for i in range(200)]
    per_class = max(2, int(500 * scale))
    jobs = []
    for w in wnids:
        (base / "train" / w / "images").mkdir(parents=True, exist_ok=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
        jobs += [(base / "train" / w / "images" / f"{w}_{i}.JPEG", len(jobs)) for i in range(per_class)]
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    n_val = max(200, int(10000 * scale))
    ann = [f"val_{i}.JPEG\t{wnids[i % 200]}\t0\t0\t63\t63" for i in range(n_val)]
    jobs += [(base / "val" / "images" / f"val_{i}.JPEG", len(jobs)) for i in range(n_val)]
    _pool(lambda j: _jpeg(j[0], 64, seed + j[1]), jobs)
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, other\n" for i, w in enumerate(wnids)))
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")


def vggsound(root: Path, scale: float, seed: int) -> None:
    n = max(309, int(199176 * scale))
    rows, jobs = [], []
    for i in range(n):
        ytid, start = f"v{i:010d}", 10 * (i % 30)
        rows.append([ytid, start, f"label {i % 309}", "test" if i % 13 == 0 else "train"])
        jobs.append((f"{ytid}_{start:06d}", i))
    (root / "frames").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)

    def one(j):
        _jpeg(root / "frames" / f"{j[0]}.jpg", 224, seed + j[1])
        _wav(root / "audio" / f"{j[0]}.wav", 5.0, 16000, seed + j[1])
    _pool(one, jobs)
    with open(root / "vggsound.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


MAKERS = {"cifar10": (cifar10, "cifar-10-batches-py/batches.meta"), "esc50": (esc50, "meta/esc50.csv"),
          "tinyimagenet": (tinyimagenet, "tiny-imagenet-200/wnids.txt"),
          "speechcommands": (speechcommands, "testing_list.txt"), "vggsound": (vggsound, "vggsound.csv")}


def make(out: Path, names, scale: float = 1.0, seed: int = 0) -> dict[str, Path]:
    """Each named stand-in under out/NAME (out/NAME-xSCALE below scale 1); the file written last marks it finished."""
    roots = {}
    for name in names:
        fn, marker = MAKERS[name]
        root = out / (name if scale == 1 else f"{name}-x{scale:g}")
        if not (root / marker).is_file():
            t0 = time.perf_counter()
            fn(root, scale, seed)
            print(f"{name}: written under {root} in {time.perf_counter() - t0:.0f} s", flush=True)
        roots[name] = root
    return roots


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--only", nargs="*", choices=list(MAKERS), default=["cifar10", "esc50", "tinyimagenet", "speechcommands"])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the official sample counts")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 0 < a.scale <= 1:
        sys.exit(f"--scale={a.scale}: expected 0 < scale <= 1")
    make(a.out.expanduser(), a.only, a.scale, a.seed)


if __name__ == "__main__":
    main()
