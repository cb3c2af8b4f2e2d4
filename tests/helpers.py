"""What the tests share besides fixtures: the repository root, the tiny-data overrides, a smoke run's argv, and
tiny in-memory modalities for tests of the training step."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data import ModalityData  # noqa: E402

TINY_DATA = ["--data.n_voices=12", "--data.max_train_images=512", "--data.max_test_images=400", "--data.knn_bank=256",
             "--data.knn_queries=128", "--data.n_mels=32", "--data.win_ms=40.0", "--data.hop_ms=20.0"]
SHAPES = {"image": (1, 16, 16), "audio": (1, 16, 20)}


def script(name: str):
    """A command line of scripts/ imported as a module (scripts/ is not a package: its files are run by path)."""
    import importlib
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module(name)


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


# ----------------------------------------------------------------------------- engine runs (test_engines, test_deployment)

RUN = ["configs/smoke.yaml", "--fed.clients=4", "--fed.clients_per_round=3", "--fed.modality_fractions=[0.4,0.4,0.2]",
       "--optim.batch_size=32", "--run.threads=1", "--run.deterministic=true", "--run.progress=false",
       "--run.final_probe=false", "--run.eval_every=0", *TINY_DATA]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
       "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


def _args(out, cache_dir, rounds=2):
    """The engines' run: RUN into `out` on the session's data cache."""
    return [*RUN, f"--fed.rounds={rounds}", f"--data.cache_dir={cache_dir}", f"--run.out_dir={out}"]


@contextlib.contextmanager
def _procs():
    """Start processes in their own sessions; on the way out kill each one's whole group."""
    started = []

    def start(cmd, log, **kw):
        p = subprocess.Popen(cmd, cwd=kw.pop("cwd", ROOT), env=kw.pop("env", ENV), stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True, **kw)
        started.append(p)
        return p
    try:
        yield start
    finally:
        for p in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _run(cmd, log, timeout=240, **kw):
    with _procs() as start:
        p = start(cmd, log, **kw)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{Path(log).read_text()[-3000:]}")
    assert rc == 0, Path(log).read_text()[-3000:]


def _weights(run_dir):
    ck = torch.load(Path(run_dir) / "last.pt", weights_only=True)
    return ck["round"], ck["model"]


def _same(a, b):
    """The two runs' last.pt hold the same round and the same global weights, bit for bit."""
    (ra, wa), (rb, wb) = _weights(a), _weights(b)
    assert ra == rb and wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"
