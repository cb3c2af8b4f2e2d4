"""Run plumbing shared by the entry scripts: the one-line exit for a user's error, seeding and derived random
streams, device and AMP selection, stop signals, and what a run records about its environment.

Nothing here runs at import.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from settings import ConfigError, UserError


def run_main(fn, argv=None):
    """Call an entry script's body; a UserError ends the process with one line on stderr and exit status 1."""
    try:
        return fn(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") != "0":  # under torchrun every rank meets the same error: rank 0 says it
            sys.exit(1)
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------- randomness

def derive_seed(*keys) -> int:
    """A 63-bit seed from a tuple of ints/strings. Every random stream of a run (partition, client
    sampling, per-client augmentation) is derived this way from the run seed, so a resumed run draws
    exactly what an uninterrupted one would."""
    h = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def make_generator(device: torch.device | str, *keys) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g


def deterministic_on(deterministic: bool | None, device) -> bool:
    """run.deterministic resolved for `device`: None (the default) means on for CPU runs, where it costs nothing
    measurable (docs/results.md), and off on CUDA, where deterministic kernels are slower."""
    return deterministic if deterministic is not None else torch.device(device).type == "cpu"


def seed_everything(seed: int, deterministic: bool | None = False, device="cpu", compile: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic_on(deterministic, device):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_deterministic = getattr(torch._C, "_set_deterministic_algorithms", None)
        if compile or set_deterministic is None:  # the public call also sets torch.compile's (inductor's) flag
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:  # the same switch for eager kernels, without importing inductor (1.5 s of every process's start)
            set_deterministic(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
          "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------- device and AMP

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but CUDA is not available; use run.device=cpu or auto")
    return dev


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16, where bf16 convolutions and matmuls are fast (measured
    here: 2.2-3.1x over fp32 for the default model); elsewhere bf16 on CPU is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_active(device: torch.device, amp: str) -> bool:
    if amp == "fp32":
        return False
    return device.type == "cuda" or (device.type == "cpu" and amp == "bf16" and cpu_has_native_bf16())


def autocast(device: torch.device, amp: str):
    """The one AMP context: bf16/fp16 autocast on CUDA, bf16 on CPUs with native bf16, else nothing."""
    if not amp_active(device, amp):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A GradScaler that is simply disabled unless fp16 on CUDA, so the loop has a single branch."""
    return torch.amp.GradScaler(device.type, enabled=(device.type == "cuda" and amp == "fp16"))


# ----------------------------------------------------------------------------- logging

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info(device: torch.device) -> dict:
    import torchaudio
    import torchvision
    info = {"python": sys.version.split()[0], "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "torchaudio": str(torchaudio.__version__),
            "device": str(device), "git": git_commit(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM): raised between local steps, or at once where nothing is to finish."""


class GracefulStop:
    """While active, SIGINT and SIGTERM set a flag instead of killing the process, so the training loop
    can finish its current step and leave a consistent run directory. While `immediate` is true (start-up, an
    evaluation: nothing that a stop would leave half-done) the signal raises Interrupted at once instead. A second
    signal acts as usual. Only the main thread can catch signals: one made in another thread (the Flower simulation
    runs its ServerApp in one) follows the main thread's active GracefulStop."""
    main: "GracefulStop | None" = None  # the main thread's, while active

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), immediate: bool = False):
        self._signum: int | None = None
        self._old = {}
        self.follows = None
        self.immediate = immediate
        try:
            for s in signals:
                self._old[s] = signal.signal(s, self._handle)
            self._outer, GracefulStop.main = GracefulStop.main, self
        except ValueError:  # not the main thread: follow the main thread's
            self._old, self.follows = {}, GracefulStop.main

    @property
    def signum(self) -> int | None:
        return self._signum if self._signum is not None or self.follows is None else self.follows.signum

    def _handle(self, signum, frame):
        self._signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
        if self.immediate:
            raise Interrupted
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then stopping "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        if self._old:
            GracefulStop.main = self._outer
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
