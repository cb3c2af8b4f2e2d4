"""Shared run plumbing for the entry scripts: typed YAML configs with dotted CLI overrides, seeding and
derived random streams, device/AMP selection, atomic checkpoint I/O, and the run log.

Nothing here runs at import. Used by pretrain.py and finetune.py; see README.md for commands.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CKPT_FORMAT = 1


class UserError(Exception):
    """A problem the user can fix (config, data, checkpoint, run directory): the entry scripts print it as one
    line and exit non-zero. Anything else is a bug and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A config problem, reported as one line naming the key."""


class RunDirError(UserError):
    """The output directory holds another run, is locked by a running one, or cannot be used."""


def expand_path(p: str | None) -> str | None:
    """`~` and $VARIABLES expanded, as a shell would (a config is not read by a shell)."""
    return None if p is None else os.path.expandvars(os.path.expanduser(p))


def run_main(fn, argv=None):
    """Call an entry script's body; a UserError ends the process with one line on stderr and exit status 1."""
    try:
        return fn(argv)
    except UserError as e:
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------- config

@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    amp: str = "bf16"             # bf16 | fp16 | fp32 autocast on CUDA; on CPU bf16 where it is native (AVX512-BF16/AMX), else fp32
    deterministic: bool = False   # torch deterministic algorithms (bit-exact resume on CPU)
    threads: int = 0              # torch CPU threads per process; 0 = torch's default. Under torchrun on CPU the ranks of a machine split it
    eval_every: int = 5           # kNN monitor every this many rounds (0 = only at the start and end)
    final_probe: bool = True      # a fast linear probe on frozen features at round 0 (random init) and at the end
    compile: bool = False         # torch.compile the shared trunk in place (optional; first steps compile)
    progress: bool = True         # tqdm bars (hidden anyway when stderr is not a terminal)
    dry_run: bool = False         # build data, partition and model, take one local step on one client, write nothing

    overwrite: bool = False       # a run.out_dir holding another run is moved aside (to OUT_DIR.old-N), never deleted

    def __post_init__(self):
        self.out_dir = expand_path(self.out_dir)
        check_choice("run.amp", self.amp, ("bf16", "fp16", "fp32"))
        check_range("run.eval_every", self.eval_every, lo=0)
        check_range("run.threads", self.threads, lo=0, hi=4096)
        check_range("run.seed", self.seed, lo=0, hi=2 ** 63 - 1)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"run.device={self.device!r}: expected auto, cpu, cuda or cuda:N")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")


def check_range(key: str, value, lo=None, hi=None, lo_open=False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value!r}: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r}: must be <= {hi}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected and
    lists where tuples are. Returns the value converted to the annotated container type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        item = args[0] if args else typing.Any
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is typing.Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def build_dataclass(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError naming
    the dotted key. Nested dataclass fields take nested dicts."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' "
                          f"(known keys in this section: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, data[name], tp)
    return cls(**kwargs)


def parse_value(text: str):
    """A CLI override value: a Python/YAML literal where it parses as one, else the plain string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", "~"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if text.strip()[:1] in "[{":  # YAML flow syntax, so --data.modalities=[image, audio] needs no quotes
        import yaml
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse value {text!r}: {e}") from e
    return text


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` overrides from the other arguments before argparse sees them
    (argparse takes an argument containing a space, like `--x.y=[1, 2]`, for a positional)."""
    def is_override(a):
        return a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]
    return [a for a in argv if not is_override(a)], [a for a in argv if is_override(a)]


def parse_with_overrides(parser, argv: list[str]):
    """argparse for an entry script whose other arguments are dotted overrides: (args, overrides)."""
    argv, overrides = split_overrides(list(argv))
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognised argument {rest[0]!r}: overrides look like --section.key=value")
    return args, overrides


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--a.b=value` overrides to a nested dict (in place) and return it."""
    for ov in overrides:
        if not ov.startswith("--") or "=" not in ov:
            raise ConfigError(f"cannot parse override {ov!r}: use --section.key=value")
        key, text = ov[2:].split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: '{p}' is not a section")
        node[parts[-1]] = parse_value(text)
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML config file as a dict of sections; a missing file, bad bytes, broken YAML or a top level that is
    not a mapping is a ConfigError naming the file (and the line)."""
    p = Path(expand_path(str(path)))
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    import yaml
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}): save the config as UTF-8") from e
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        hint = " (YAML indents with spaces, never tabs)" if "\t" in p.read_text(encoding="utf-8") else ""
        raise ConfigError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', None) or e}{hint}") from e
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def load_config(cls, path: str | os.PathLike | None, overrides: list[str] = ()):
    """YAML file (optional) + dotted overrides -> dataclass `cls`, validated."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return build_dataclass(cls, data)


def to_dict(cfg) -> dict:
    """Dataclass -> plain dict of primitives/lists (YAML- and checkpoint-safe)."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += dict_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


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


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
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


_CPU_BF16: bool | None = None


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16, where bf16 convolutions and matmuls are fast (measured
    here: 2.2-3.1x over fp32 for the default model); elsewhere bf16 on CPU is emulated and slower."""
    global _CPU_BF16
    if _CPU_BF16 is None:
        try:
            flags = Path("/proc/cpuinfo").read_text()
            _CPU_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
        except OSError:
            _CPU_BF16 = False
    return _CPU_BF16


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


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(UserError, RuntimeError):
    pass


def tensor_digest(obj, primitives: bool = True) -> str:
    """sha256 over a nested dict/list in key order: every tensor's bytes and, with primitives=True, every other
    value (round, config, history), so a checkpoint corrupted or edited on disk is detected even when it still
    unpickles. primitives=False is the tensors-only digest of checkpoints written before it covered everything."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                if k not in ("sha256", "digest"):
                    h.update(str(k).encode())
                    walk(o[k])
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x)
        elif primitives:
            h.update(repr((type(o).__name__, o)).encode())
    walk(obj)
    return h.hexdigest()


def save_checkpoint(obj: dict, path: str | os.PathLike, keep_previous: bool = True) -> None:
    """Write atomically: temp file in the same directory, flush + fsync, then rename (and fsync the
    directory). The checkpoint being replaced is kept as `<name>.prev`, so a file found truncated or
    corrupted later has a fallback. The tensors' sha256 is stored inside for that check."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = {**obj, "sha256": tensor_digest(obj), "digest": "all"}
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get("FSSUAVL_TEST_CKPT_DELAY"):  # scripts/kill_resume.py widens this window to kill inside it
            time.sleep(float(os.environ["FSSUAVL_TEST_CKPT_DELAY"]))
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                              f"the previous checkpoint (if any) is intact") from e


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load with weights_only=True (tensors and primitives only); a clear error naming the file when it
    is missing, truncated, corrupted (checksum mismatch) or not a checkpoint of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (a directory: pass RUN_DIR/last.pt)" if path.is_dir() else ""))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        # torch's own text advises retrying with weights_only=False: never pass that on
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "weights_only" not in ln]
        glob = next((ln for ln in lines if "global" in ln.lower()), None)
        if glob is not None:  # name the object only: torch's advice (allow-listing it) would be just as unsafe
            import re
            name = re.search(r"GLOBAL\s+([\w.]+)", glob, re.IGNORECASE)
            raise CheckpointError(f"refusing {path}: it holds a Python object other than tensors and plain values "
                                  f"({name.group(1) if name else 'an unsupported global'}); loading it could run "
                                  f"arbitrary code. Use a checkpoint written by pretrain.py") from e
        raise CheckpointError(f"checkpoint {path} is unreadable: truncated, or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {(lines[0] if lines else '')[:200]})") from e
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not an FSSUAVL checkpoint (format {CKPT_FORMAT})")
    if "sha256" in obj and obj["sha256"] != tensor_digest(obj, primitives=obj.get("digest") == "all"):
        raise CheckpointError(f"checkpoint {path} is corrupted or was edited: its contents do not match the stored sha256")
    return obj


def load_latest_checkpoint(run_dir: str | os.PathLike, name: str = "last.pt", warn=print) -> tuple[dict, Path] | None:
    """The newest good checkpoint of a run: `name`, or `name.prev` when `name` is missing, truncated or
    corrupted. A bad `name` is moved aside to `name.corrupt` (a warning names it), so the next save cannot
    rotate it over the good previous copy. None when the directory holds neither."""
    run_dir = Path(run_dir)
    errors = []
    for p in (run_dir / name, run_dir / (name + ".prev")):
        if not p.exists():
            continue
        try:
            return load_checkpoint(p), p
        except CheckpointError as e:
            errors.append(str(e))
            if p.name == name:
                bad = p.with_name(name + ".corrupt")
                os.replace(p, bad)
                warn(f"warning: {e}; moved it to {bad} and trying the previous checkpoint")
            else:
                warn(f"warning: {e}")
    if errors:
        raise CheckpointError("no usable checkpoint in " + str(run_dir) + ": " + " | ".join(errors))
    return None


# ----------------------------------------------------------------------------- the run directory

RUN_FILES = ("last.pt", "last.pt.prev", "log.jsonl", "config.yaml")


class RunDir:
    """The output directory of one run, held under an exclusive lock (fcntl.flock on OUT_DIR/.lock, released
    by the kernel when the process ends, even on SIGKILL) so two runs cannot interleave their logs and
    checkpoints. `prepare` refuses a directory that holds another run unless resuming, or moves it aside."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def holds_run(self) -> bool:
        return any((self.path / f).exists() for f in RUN_FILES)

    def describe(self) -> str:
        ck = self.path / "last.pt"
        if ck.exists():
            try:
                obj = torch.load(ck, map_location="cpu", weights_only=True)
                done, total = obj.get("round"), obj.get("config", {}).get("fed", {}).get("rounds")
                return f"a run at round {done} of {total}" + (" (finished)" if done == total else "")
            except Exception:  # noqa: BLE001 - only for the message
                return "a run with an unreadable last.pt"
        return "a partial run (no checkpoint yet)"

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create and lock the directory. Without resume, a directory holding a run is refused, or with
        overwrite moved aside to PATH.old-N (never deleted)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run.out_dir={self.path} is a file, not a directory: choose another run.out_dir")
        if not resume and self.holds_run():
            if not overwrite:
                raise RunDirError(f"{self.path} already holds {self.describe()}. Continue it with "
                                  f"`python pretrain.py --resume {self.path}`, choose another --run.out_dir, or pass "
                                  f"--run.overwrite=true to move it aside and start again")
            self.lock()  # do not move a directory another process is writing
            self.release()
            n = 1
            while self.path.with_name(f"{self.path.name}.old-{n}").exists():
                n += 1
            aside = self.path.with_name(f"{self.path.name}.old-{n}")
            os.replace(self.path, aside)
            print(f"moved the previous run in {self.path} to {aside}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run.out_dir={self.path}: {e.strerror or e}") from e
        self.lock()

    def lock(self) -> None:
        import fcntl
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.path} is in use by another run (PID {holder}); wait for it to finish, "
                              f"stop it, or choose another --run.out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


class JsonlLog:
    """Append one JSON object per line; flushed each write so nothing is lost on a kill."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def truncate_after(self, round_idx: int) -> None:
        """Drop lines of rounds after `round_idx` (a resumed run re-logs them) and any line cut short by
        a kill, rewriting the file atomically."""
        if not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("round", -1) <= round_idx:
                keep.append(ln)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)


class GracefulStop:
    """While active, SIGINT and SIGTERM set a flag instead of killing the process, so the training loop
    can finish its current step and leave a consistent run directory. A second signal acts as usual."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signum: int | None = None
        self._old = {}
        try:
            for s in signals:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._old = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then stopping "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
