"""Which datasets exist, where their files go and how each is read: one table, DATASETS, and `load_data`, the one
entry point every stage loads data through.

    python catalog.py                # list the datasets with their official layouts
    python catalog.py NAME ROOT      # load one dataset from ROOT and print what it holds

A config names one image and one audio dataset as `data.dataset: cifar10+esc50` (roots in data.image_root /
data.audio_root), or a dataset of its own that yields both (`avfashion`, `vggsound`) with data.root. A new dataset
is one reader (readers.py) and one DATASETS entry.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import downloads
import fluidr3
import readers
from avfashion import load_avfashion
from data import (DataConfig, DataError, MissingData, ModalityData, audio_modality, expected_audio_shape, image_modality,
                  logmel_bytes, pick_tier, stored_bytes)
from settings import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    kind: str                             # image | audio (half of IMAGE+AUDIO) | both (a dataset of its own)
    read: Callable                        # image/audio: (root, cfg, BadFiles) -> arrays; both: (cfg, device, progress) -> {m: ModalityData}
    layout: str                           # the official files under its root, quoted when they are missing
    download: Optional[Callable] = None   # (root) -> None, for data.download=true (needs internet)
    pairs: bool = False                   # both: image i and clip i come from one recording (real pairs)
    modalities: tuple = ("image", "audio")  # both: the modalities it yields (image/audio: the halves of IMAGE+AUDIO)
    channels: int = 3                     # image/both: channels of its images (known before any file is read)
    size: int = 0                         # image/both: their side when fixed by the dataset (0: data.image_size or 64)


def _load_vggsound(cfg: DataConfig, device, progress: bool = True) -> dict[str, ModalityData]:
    """VGGSound: a frame and the audio of each clip, decoded once into one cache entry."""
    root = Path(cfg.root) if cfg.root else readers.default_root(cfg.dataset)

    def build(bad):  # one flat dict of arrays for the cache: image_*, audio_*, classes
        image, audio = readers.read_vggsound(root, cfg, bad)
        flat = {f"image_{k}": v for k, v in image.items() if k != "classes"}
        return flat | {f"audio_{k}": v for k, v in audio.items() if k != "classes"} | {"classes": image["classes"]}
    both = readers.cached("paired", cfg.dataset, root, cfg, {**_audio_params(cfg), "size": cfg.image_size}, build)
    split = {m: {k[len(m) + 1:]: v for k, v in both.items() if k.startswith(m + "_")}
             | {"classes": both["classes"], "source": both["source"]} for m in ("image", "audio") if m in cfg.modalities}
    return convert(split, cfg, device)


@dataclass(frozen=True)
class ModalityBuilder:
    """How a modality's decoded arrays become its ModalityData: `build(arrays, cfg, device, tier, source)` places the
    samples in the residency tier it is given (data.residency), `nbytes(arrays, cfg)` says what they will take, so
    the tier is chosen for all modalities together before any is built."""
    build: Callable
    nbytes: Callable


BUILDERS = {
    "image": ModalityBuilder(image_modality, stored_bytes),
    "audio": ModalityBuilder(audio_modality, logmel_bytes),
}


def convert(arrays: dict, cfg: DataConfig, device) -> dict[str, ModalityData]:
    """Decoded arrays {modality: arrays, with the "source" cache entry they came from} -> {modality: ModalityData}
    in the residency tier chosen for all of them together (data.residency; auto says which and why). Every dataset's
    arrays come through here, so every modality with a BUILDERS entry honours data.residency."""
    missing = sorted(set(arrays) - set(BUILDERS))
    if missing:
        raise DataError(f"modality {missing[0]!r} has no catalog.BUILDERS entry: add one (how its arrays become samples "
                        f"in a residency tier; image_modality serves any uint8 (C, H, W) samples)")
    tier = pick_tier(cfg, device, sum(BUILDERS[m].nbytes(a, cfg) for m, a in arrays.items()))
    return {m: BUILDERS[m].build(a, cfg, device, tier, a["source"]) for m, a in arrays.items()}


DATASETS = {
    "avfashion": DatasetSpec("both", load_avfashion, "built offline from Debian's dataset-fashion-mnist and espeak-ng "
                             "(python avfashion.py)", channels=1, size=28),
    "vggsound": DatasetSpec("both", _load_vggsound, "vggsound.csv (youtube_id,start_seconds,label,split; no header), "
                            "frames/ID_START.jpg, audio/ID_START.wav|flac", pairs=True),
    "cifar10": DatasetSpec("image", lambda r, c, b: readers.read_cifar(r, 10, c, b),
                           "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (or those files directly "
                           "in the root)", readers.torchvision_download("cifar10"), size=32),
    "cifar100": DatasetSpec("image", lambda r, c, b: readers.read_cifar(r, 100, c, b),
                            "cifar-100-python/{train, test, meta} (or those files directly in the root)",
                            readers.torchvision_download("cifar100"), size=32),
    "stl10": DatasetSpec("image", readers.read_stl10,
                         "stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt}",
                         readers.torchvision_download("stl10"), size=96),
    "tinyimagenet": DatasetSpec("image", readers.read_tinyimagenet, "tiny-imagenet-200/{wnids.txt, words.txt, "
                                "train/WNID/images/*.JPEG, val/val_annotations.txt, val/images/*.JPEG}",
                                downloads.fetcher("tinyimagenet")),
    "imagefolder": DatasetSpec("image", readers.read_imagefolder,
                               "train/CLASS/*.jpg|png... and val/CLASS/... (or test/CLASS/...)"),
    "esc50": DatasetSpec("audio", readers.audio_files(readers.list_esc50),
                         "meta/esc50.csv and audio/*.wav (the ESC-50 repository layout)", downloads.fetcher("esc50")),
    "speechcommands": DatasetSpec("audio", readers.audio_files(readers.list_speechcommands),
                                  "WORD/*.wav folders, validation_list.txt and testing_list.txt (speech_commands_v0.02)",
                                  downloads.fetcher("speechcommands")),
    "urbansound8k": DatasetSpec("audio", readers.audio_files(readers.list_urbansound8k),
                                "metadata/UrbanSound8K.csv and audio/fold1..fold10/*.wav", downloads.fetcher("urbansound8k")),
    "audiofolder": DatasetSpec("audio", readers.audio_files(readers.list_audiofolder),
                               "labels.csv with columns file,label (optional split=train|test, group) and the files it names"),
    "fluidr3": DatasetSpec("audio", fluidr3.render_fluidr3, f"a General MIDI .sf2 soundfont (default "
                           f"{readers.FLUIDR3_SF2}, Debian package fluid-soundfont-gm) and fluidsynth"),
}


def names(kind: str) -> list[str]:
    return [n for n, s in DATASETS.items() if s.kind == kind]


def dataset_modalities(name: str) -> tuple[str, ...]:
    """The modalities the dataset `name` (a dataset of its own or IMAGE+AUDIO) yields."""
    spec = DATASETS.get(name)
    return spec.modalities if spec is not None and spec.kind == "both" else ("image", "audio")


def check_dataset_name(name: str) -> None:
    """A ConfigError unless `name` is a dataset of its own or IMAGE+AUDIO of the table."""
    if DATASETS.get(name) is not None and DATASETS[name].kind == "both":
        return
    parts = name.split("+")
    if len(parts) != 2 or parts[0] not in names("image") or parts[1] not in names("audio"):
        raise ConfigError(f"data.dataset={name!r}: expected {', '.join(names('both'))}, or IMAGE+AUDIO with IMAGE in "
                          f"{', '.join(names('image'))} and AUDIO in {', '.join(names('audio'))}")


def expected_input(cfg: DataConfig) -> dict[str, tuple]:
    """What the config alone says of each modality's input, before a file is read, as a checkpoint is checked against
    it: image channels (the side is left out: a checkpoint of an older run may name another), and the whole audio
    shape (1, n_mels, frames). A config edited to another dataset or front-end is caught by this."""
    return {m: s[:1] if m == "image" else s for m, s in input_shapes(cfg).items()}


def input_shapes(cfg: DataConfig) -> dict[str, tuple]:
    """The whole input of each trained modality, from the config alone: (channels, side, side) images and
    (1, n_mels, frames) log-mels. A Flower server with node-local data builds its model from these, and every
    SuperNode decodes its own files to them."""
    image = DATASETS.get(cfg.dataset) or DATASETS.get(cfg.dataset.split("+")[0])
    out = {}
    if "image" in cfg.modalities:
        side = image.size or cfg.image_size or 64
        out["image"] = (image.channels, side, side)
    if "audio" in cfg.modalities:
        out["audio"] = expected_audio_shape(cfg)
    return out


def _audio_params(cfg: DataConfig) -> dict:
    return {"sr": cfg.sample_rate, "clip": cfg.clip_seconds, "fold": cfg.test_fold, "seed": cfg.build_seed}


def read_arrays(name: str, root: Path, cfg: DataConfig) -> dict:
    """One half of IMAGE+AUDIO, decoded (or downloaded first, with data.download=true) into its cache entry."""
    spec = DATASETS[name]
    if cfg.download and spec.download is not None:  # before the cache key, which hashes the files under root
        spec.download(root)

    def build(bad):
        arrays = spec.read(root, cfg, bad)
        if spec.kind == "image":
            bad.finish(len(arrays["train_y"]) + len(arrays["test_y"]) + len(bad.bad))
        return arrays
    if spec.kind == "image":
        return readers.cached("image", name, root, cfg, {"size": cfg.image_size}, build)
    return readers.cached("audio", name, root, cfg, _audio_params(cfg), build)


def load_named(cfg: DataConfig, device, progress: bool = True) -> dict[str, ModalityData]:
    """The configured dataset, for the configured modalities, as {modality: ModalityData} on `device`."""
    check_dataset_name(cfg.dataset)
    if DATASETS.get(cfg.dataset) is not None:
        return DATASETS[cfg.dataset].read(cfg, device, progress)
    arrays = {}
    image_name, audio_name = cfg.dataset.split("+")
    if "image" in cfg.modalities:
        root = Path(cfg.image_root) if cfg.image_root else readers.default_root(image_name)
        arrays["image"] = read_arrays(image_name, root, cfg)
    if "audio" in cfg.modalities:
        root = Path(cfg.audio_root) if cfg.audio_root else readers.default_root(audio_name)
        arrays["audio"] = read_arrays(audio_name, root, cfg)
    return convert(arrays, cfg, device)


def load_data(cfg: DataConfig, device, progress: bool = True) -> dict[str, ModalityData]:
    """The one entry point every stage loads data through. Missing files are named with the dataset's official
    layout; a training split with fewer than two classes is refused."""
    try:
        data = load_named(cfg, device, progress)
    except MissingData as e:
        raise DataError(f"{e}. Expected layout: {DATASETS[e.name].layout}. Point data.image_root / data.audio_root "
                        f"(or data.root) at the dataset.") from e
    want = input_shapes(cfg)
    for m, md in data.items():
        if m in want and tuple(md.shape) != tuple(want[m]):
            name = cfg.dataset if cfg.dataset in DATASETS else cfg.dataset.split("+")[0 if m == "image" else 1]
            spec = DATASETS[name]
            raise DataError(f"{name}: its {m} inputs come out as {tuple(md.shape)}, but " + (
                f"its DATASETS entry declares channels={spec.channels}, size={spec.size} (so {tuple(want[m])}): set the "
                f"entry's channels and size to what its reader yields (a checkpoint is checked against them)"
                if m == "image" else f"the audio options give {tuple(want[m])}: its reader must return clips of "
                f"data.clip_seconds at data.sample_rate"))
        found = torch.unique(md.train_y).numel()
        if found < 2:
            raise DataError(f"{cfg.dataset}: the {m} training split has {found} class; contrastive pretraining and "
                            f"its evaluation need at least two labelled classes")
    return data


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        for n, s in DATASETS.items():
            print(f"{n:15s} {s.kind:6s} {s.layout}")
        if argv:
            sys.exit("usage: python catalog.py NAME ROOT")
        return
    name, root = argv
    if name not in DATASETS:
        sys.exit(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}")
    kind = DATASETS[name].kind
    if kind == "both":
        cfg = DataConfig(dataset=name, root=root)
    elif kind == "image":
        cfg = DataConfig(dataset=f"{name}+esc50", image_root=root, modalities=("image",))
    else:
        cfg = DataConfig(dataset=f"cifar10+{name}", audio_root=root, modalities=("audio",))
    for m, md in load_data(cfg, "cpu").items():
        print(f"{m}: train {tuple(md.train_x.shape)}, test {tuple(md.test_x.shape)}, {len(md.classes)} classes")


def has_real_pairs(name: str) -> bool:
    """Whether the dataset's image i and clip i belong together (else the paired task pairs them by class)."""
    return name in DATASETS and DATASETS[name].pairs


if __name__ == "__main__":
    main()
