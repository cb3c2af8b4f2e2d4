"""Checkpoints and the run directory: atomic, digest-checked `last.pt` files loaded with weights_only=True, the
locked output directory of a run, and its one-JSON-object-per-round log.

Nothing here runs at import.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from settings import ConfigError, UserError

CKPT_FORMAT = 1


def launcher() -> str:
    """The command that runs pretraining the way this process was started (for resume advice)."""
    if os.environ.get("FSSUAVL_LAUNCHER"):  # set by an engine's own command line (fedengines/flower_app.py)
        return os.environ["FSSUAVL_LAUNCHER"]
    return "torchrun --nproc_per_node=G pretrain.py" if "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ) else "python pretrain.py"


class RunDirError(UserError):
    """The output directory holds another run, is locked by a running one, or cannot be used."""


class CheckpointError(UserError, RuntimeError):
    pass


class UndigestedCheckpoint(CheckpointError):
    """A readable checkpoint refused by policy (no digest over all of it): kept where it is, never renamed corrupt."""


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


def save_checkpoint(obj: dict, path: str | os.PathLike, keep_previous: bool = True,
                    before_replace: Callable[[], None] | None = None) -> None:
    """Write atomically: temp file in the same directory, flush + fsync, then rename (and fsync the
    directory). The checkpoint being replaced is kept as `<name>.prev`, so a file found truncated or
    corrupted later has a fallback. The tensors' sha256 is stored inside for that check. before_replace() runs
    between the write and the rename (scripts/paused_saves.py widens that window for kill tests)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = {**obj, "sha256": tensor_digest(obj), "digest": "all"}
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError ("file write failed")
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {path}: {getattr(e, 'strerror', None) or e}; "
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
    full = "sha256" in obj and obj.get("digest") == "all"
    if not full:
        if os.environ.get("FSSUAVL_ACCEPT_UNDIGESTED") != "1":
            raise UndigestedCheckpoint(f"checkpoint {path} carries no sha256 over all of its contents (written by an older "
                                  f"version, or its digest was removed), so corruption or an edit cannot be detected. "
                                  f"If you trust the file, accept it knowingly: FSSUAVL_ACCEPT_UNDIGESTED=1")
        print(f"warning: loading {path} without a full digest (FSSUAVL_ACCEPT_UNDIGESTED=1)")
    if "sha256" in obj and obj["sha256"] != tensor_digest(obj, primitives=obj.get("digest") == "all"):
        raise CheckpointError(f"checkpoint {path} is corrupted or was edited: its contents do not match the stored sha256")
    return obj


def load_latest_checkpoint(run_dir: str | os.PathLike, name: str = "last.pt", warn=print) -> tuple[dict, Path] | None:
    """The newest good checkpoint of a run: `name`, or `name.prev` when `name` is missing, truncated or
    corrupted. A bad `name` is moved aside to `name.corrupt` (a warning names it), so the next save cannot
    rotate it over the good previous copy; one refused only by policy (UndigestedCheckpoint) is left in place and
    the refusal raised, so following its advice finds it. None when the directory holds neither."""
    run_dir = Path(run_dir)
    errors = []
    for p in (run_dir / name, run_dir / (name + ".prev")):
        if not p.exists():
            continue
        try:
            return load_checkpoint(p), p
        except UndigestedCheckpoint:
            raise
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


def logged_rounds(run_dir: str | os.PathLike) -> list[int]:
    """The trained rounds (>= 1) a run directory's log.jsonl records."""
    path = Path(run_dir) / "log.jsonl"
    out = []
    for ln in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        try:
            r = json.loads(ln).get("round")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(r, int) and not isinstance(r, bool) and r >= 1:
            out.append(r)
    return out


def refuse_restart(run_dir: str | os.PathLike) -> None:
    """A resume that found no checkpoint would start the run over and rewrite its log: refuse that when the log
    records trained rounds (their checkpoint was moved or deleted), naming what to do instead."""
    rounds = logged_rounds(run_dir)
    if rounds:
        aside = [p.name for p in Path(run_dir).glob("last.pt*") if p.name not in ("last.pt", "last.pt.prev")]
        raise CheckpointError(f"--resume {run_dir}: no checkpoint to continue from, but its log.jsonl records rounds "
                              f"{min(rounds)}-{max(rounds)}: starting over would rewrite them, so nothing was done. "
                              + (f"It holds {', '.join(sorted(aside))}: if you trust it, move it back to last.pt and "
                                 f"resume; " if aside else "Restore its last.pt and resume, ")
                              + "or start afresh with --run.overwrite=true (the old run is moved aside)")


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
                                  f"`{launcher()} --resume {self.path}`, choose another --run.out_dir, or pass "
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


class JsonlLog:
    """Append one JSON object per line; flushed each write so nothing is lost on a kill."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def truncate_after(self, round_idx: int, warn=None) -> list[int]:
        """Drop lines of rounds after `round_idx` (a resumed run re-logs them), any line cut short by a kill and any
        record without an integer round, rewriting the file atomically; warn(line) names each line dropped for any
        reason but a later round. Returns the rounds 0..round_idx that have no record (deleted or lost), so the
        caller can say so."""
        if self.path.is_dir():
            raise RunDirError(f"{self.path} is a directory, not the run's log: move it away, then resume")
        keep, seen = [], set()
        lines = self.path.read_text(errors="replace").splitlines() if self.path.exists() else []
        for i, ln in enumerate(lines, 1):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                why = "cut short (a write stopped by a kill)" if i == len(lines) else "not JSON"
                rec = None
            r = rec.get("round") if isinstance(rec, dict) else None
            if isinstance(r, int) and not isinstance(r, bool) and r <= round_idx and r not in seen:
                keep.append(ln)
                seen.add(r)
                continue
            if isinstance(r, int) and not isinstance(r, bool):
                why = None if r > round_idx else f"a second record of round {r}"
            elif rec is not None:
                why = "not a round record (no integer round)"
            if why and warn is not None:
                warn(f"warning: {self.path} line {i}: {why}; dropped from the log")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)
        return [r for r in range(round_idx + 1) if r not in seen]


class TensorBoardLog:
    """Every numeric scalar of each log record (`knn_image` as knn/image, ...) at step = its round, as TensorBoard
    event files in `log_dir` (run.tensorboard). A run starting at `first_round` (0, or where a resume continues)
    has TensorBoard drop the events an interrupted run left from there on, as the JSON log drops its records."""

    def __init__(self, log_dir: str | os.PathLike, first_round: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"run.tensorboard=true needs the tensorboard package ({e}): pip install tensorboard, "
                              f"or set run.tensorboard=false") from e
        self.writer = SummaryWriter(str(log_dir), purge_step=first_round)

    def write(self, record: dict) -> None:
        r = record["round"]
        for k, v in record.items():
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k.replace("_", "/", 1), v, r)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

