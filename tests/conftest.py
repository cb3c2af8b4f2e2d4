"""Shared fixtures: the working directory at the repository root, and a private AV-Fashion cache (12 voices) built
once per session (per worker: `bash setup.sh test` runs pytest-xdist with one worker per core).

Every test process and the processes it starts run one CPU thread (OMP_NUM_THREADS=1, set before torch is imported;
configs/smoke.yaml leaves run.threads at torch's default). Two workers of two OpenMP threads each on two cores, or
one on a core another job is using, wait at every parallel region for a thread that is not running: a smoke run
took 7.4 s with one thread beside one other job and 28-87 s with two threads beside two (docs/tests.md)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest

from helpers import have_default_data


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (engines, full runs); CI runs these too")


@pytest.fixture
def in_root(monkeypatch):
    """Run the test from the repository root, where the configs' relative paths resolve."""
    from helpers import ROOT
    monkeypatch.chdir(ROOT)


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
    from catalog import load_data
    from data import DataConfig
    cfg = DataConfig(n_voices=12, max_train_images=512, n_mels=32, win_ms=40.0, hop_ms=20.0, cache_dir=str(cache_dir))
    return cfg, load_data(cfg, torch.device("cpu"), progress=False)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
    """The engines' in-process run (helpers.RUN), which every other engine must equal bit for bit; a subprocess,
    so the test process keeps its thread settings."""
    import sys
    from helpers import _args, _run
    out = tmp_path_factory.mktemp("engines") / "inprocess"
    _run([sys.executable, "pretrain.py", *_args(out, cache_dir)], out.parent / "inprocess.log")
    return out
