"""Shared fixtures: the repo on sys.path, a tiny AV-Fashion cache (12 voices) built once per session."""
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_DATA = ["--data.n_voices=12", "--data.max_train_images=512", "--data.knn_bank=256", "--data.knn_queries=128",
             "--data.n_mels=32", "--data.win_ms=40.0", "--data.hop_ms=20.0"]


def smoke_args(out, cache_dir, *extra) -> list[str]:
    """pretrain.py's argv for a tiny configs/smoke.yaml run into `out` on the session's private data cache."""
    return ["configs/smoke.yaml", f"--run.out_dir={out}", f"--data.cache_dir={cache_dir}", "--run.progress=false",
            *TINY_DATA, *extra]


@pytest.fixture
def in_root(monkeypatch):
    """Run the test from the repository root, where the configs' relative paths resolve."""
    monkeypatch.chdir(ROOT)


def have_default_data() -> bool:
    from data import FASHION_MNIST_DIR
    return shutil.which("espeak-ng") is not None and Path(FASHION_MNIST_DIR).is_dir()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private cache for AV-Fashion builds. Without the Debian packages the tests that need real data
    are skipped locally, but fail in CI (CI=true), where the set-up command must have installed them."""
    if not have_default_data():
        if os.environ.get("CI"):
            pytest.fail("espeak-ng / dataset-fashion-mnist missing in CI: the set-up command must install them")
        pytest.skip("needs the Debian packages espeak-ng and dataset-fashion-mnist (bash setup.sh installs them)")
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_data(cache_dir):
    import torch
    from data import DataConfig
    from readers import load_data
    cfg = DataConfig(n_voices=12, max_train_images=512, n_mels=32, win_ms=40.0, hop_ms=20.0, cache_dir=str(cache_dir))
    return cfg, load_data(cfg, torch.device("cpu"), progress=False)
