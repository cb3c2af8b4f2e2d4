"""What the tests share besides fixtures: the repository root, the tiny-data overrides, a smoke run's argv, and
tiny in-memory modalities for tests of the training step."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data import ModalityData  # noqa: E402

TINY_DATA = ["--data.n_voices=12", "--data.max_train_images=512", "--data.knn_bank=256", "--data.knn_queries=128",
             "--data.n_mels=32", "--data.win_ms=40.0", "--data.hop_ms=20.0"]
SHAPES = {"image": (1, 16, 16), "audio": (1, 16, 20)}


def smoke_args(out, cache_dir, *extra) -> list[str]:
    """pretrain.py's argv for a tiny configs/smoke.yaml run into `out` on the session's private data cache."""
    return ["configs/smoke.yaml", f"--run.out_dir={out}", f"--data.cache_dir={cache_dir}", "--run.progress=false",
            *TINY_DATA, *extra]


def have_default_data() -> bool:
    from avfashion import FASHION_MNIST_DIR
    return shutil.which("espeak-ng") is not None and Path(FASHION_MNIST_DIR).is_dir()


def tiny_modalities(n=48) -> dict:
    """Random uint8 images (1, 16, 16) and fp16 log-mels (1, 16, 20), n each, 4 classes: {modality: ModalityData}."""
    g = torch.Generator().manual_seed(0)
    img = ModalityData(torch.randint(0, 256, (n, *SHAPES["image"]), generator=g, dtype=torch.uint8),
                       torch.arange(n) % 4, torch.zeros(2, *SHAPES["image"], dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                       list("abcd"), torch.tensor([0.5]), torch.tensor([0.25]))
    aud = ModalityData(torch.randn(n, *SHAPES["audio"], generator=g).half(), torch.arange(n) % 4,
                       torch.zeros(2, *SHAPES["audio"]).half(), torch.zeros(2, dtype=torch.long), list("abcd"),
                       torch.tensor([0.0]), torch.tensor([1.0]))
    return {"image": img, "audio": aud}


def one_line_error(fn, *args) -> str:
    """Call an entry script's main, expecting a user's error: one line, `error: ...`, no traceback."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    return text


def log_rounds(out) -> list[int]:
    """The rounds of a run directory's log.jsonl, in file order."""
    return [json.loads(ln)["round"] for ln in (out / "log.jsonl").read_text().splitlines()]
