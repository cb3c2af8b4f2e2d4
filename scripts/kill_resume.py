"""Kill pretraining runs with SIGKILL, resume each after every kill, and compare the end state (the global weights,
each client's private state, the server strategy's state, a kept optimiser, the loss scale) with an uninterrupted
run of the same seed (deterministic mode, CPU), on any engine.

    python scripts/kill_resume.py --kills 30
    python scripts/kill_resume.py --kills 10 --engine torchrun        # the whole torchrun job (both ranks) killed
    python scripts/kill_resume.py --kills 10 --engine flower_sim      # the Flower simulation, Ray included
    python scripts/kill_resume.py --kills 5 --config configs/smoke.yaml --rounds 8 --data.n_voices=12
    python scripts/kill_resume.py --kills 10 --data.residency=disk            # the memory-mapped tier

Kill moments cycle through four kinds:
- `startup`: before the attempt has logged anything of its own (imports, data load, resume);
- `random`: uniform over what is left of the run, estimated from the reference run's start-up time and
  per-round time;
- `early`: inside the first round after the attempt's first log record;
- `ckpt`: while a checkpoint is being written. The run (started through scripts/paused_saves.py) pauses
  CKPT_PAUSE_S seconds between writing last.pt.tmp and renaming it, and is killed inside that window;
- `resumed_round`: an attempt that resumes, inside the first round it trains (once it has rewritten config.yaml,
  which ends its start-up, plus a uniform share of one round).

A kill is SIGKILL to the attempt's whole process group (every rank, Ray's workers). After every run it checks
that log.jsonl holds exactly one record per round. Any --section.key=value argument is passed on. It prints the
kills by kind and "N kills survived, M state mismatches, L log errors", and exits non-zero on any mismatch or
log error.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fedengines.localhost import process_tree  # noqa: E402
from settings import int_at_least, split_overrides  # noqa: E402

KINDS = ("startup", "random", "early", "ckpt", "resumed_round")
CKPT_PAUSE_S = 0.3  # every checkpoint write pauses this long before its rename (scripts/paused_saves.py)
STATE = ("model", "client_state", "server_state", "optimizer", "scaler")  # what a resumed run must end with, bit for bit


def command(engine: str, config: str, out_dir: Path, rounds: int, extra: list[str]) -> list[str]:
    run = [config, "--resume", f"--run.out_dir={out_dir}", f"--fed.rounds={rounds}", "--run.deterministic=true",
           "--run.device=cpu", "--run.threads=1", "--run.progress=false", "--run.eval_every=0", *extra]
    paused = [str(ROOT / "scripts" / "paused_saves.py"), str(CKPT_PAUSE_S)]  # the `ckpt` kills' window
    if engine == "inprocess":
        return [sys.executable, *paused, "pretrain.py", *run]
    if engine == "torchrun":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={port}", *paused, "pretrain.py", *run]
    return [sys.executable, *paused, "-m", "fedengines.flower_app", "--supernodes=2", *run]


def final_state(out_dir: Path) -> dict:
    """The end state a run must reach whatever stopped it: the global weights, every client's private tensors, the
    server strategy's state (FedAvgM's momentum, ...), a kept optimiser (optim.reset_state=false) and the loss
    scale."""
    ck = torch.load(out_dir / "last.pt", weights_only=True)
    return {k: ck.get(k) for k in STATE}


def same_state(a, b) -> bool:
    """Equal, tensors bit for bit, through nested dicts and lists."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def log_rounds(out_dir: Path) -> list[int]:
    return [json.loads(ln)["round"] for ln in (out_dir / "log.jsonl").read_text().splitlines() if ln.strip()]


def records(out_dir: Path) -> int:
    log = out_dir / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def wait_for_kill_moment(proc, out_dir: Path, kind: str, rng: random.Random, timing: dict, rounds: int) -> bool:
    """Block until the moment to kill `proc` (True), or until it exits by itself (False)."""
    t0, start_records = time.perf_counter(), records(out_dir)
    done = max(0, start_records - 1)  # rounds this attempt will not redo
    if kind == "startup":
        deadline = t0 + rng.uniform(0.0, timing["startup"])
        cond = lambda: time.perf_counter() >= deadline  # noqa: E731
    elif kind == "random":  # over what is left of this attempt: start-up, then the rounds still to do
        deadline = t0 + rng.uniform(0.0, timing["startup"] + timing["round"] * (rounds - done))
        cond = lambda: time.perf_counter() >= deadline  # noqa: E731
    elif kind == "early":  # the attempt's first new record is written, the next one is not yet: inside a round
        extra, seen = rng.uniform(0.0, timing["round"]), {}

        def cond():
            if "t" not in seen and records(out_dir) > start_records:
                seen["t"] = time.perf_counter()
            return "t" in seen and time.perf_counter() >= seen["t"] + extra
    elif kind == "resumed_round" and start_records == 0:  # nothing to resume yet: a start-up kill instead
        deadline = t0 + rng.uniform(0.0, timing["startup"])
        cond = lambda: time.perf_counter() >= deadline  # noqa: E731
    elif kind == "resumed_round":  # inside the first round a resumed attempt trains: it writes config.yaml when its
        started, extra, seen = time.time(), rng.uniform(0.0, timing["round"]), {}  # start-up ends, then trains

        def cond():
            cfg = out_dir / "config.yaml"
            if "t" not in seen and cfg.exists() and cfg.stat().st_mtime >= started:
                seen["t"] = time.perf_counter()
            return "t" in seen and time.perf_counter() >= seen["t"] + extra
    else:  # inside a checkpoint write
        cond = lambda: (out_dir / "last.pt.tmp").exists()  # noqa: E731
    while proc.poll() is None:
        if cond():
            return True
        time.sleep(0.002)
    return False


def kill_all(proc) -> None:
    """SIGKILL the attempt: its process group and every process below it."""
    for pid in process_tree([proc.pid])[1:]:  # torchrun starts its ranks in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_to_completion(cmd_fn, out_dir: Path, rng: random.Random, timing: dict, rounds: int, kills_left: int,
                      kinds: Counter, log, first_kind: int = 0) -> int:
    """Start the command, SIGKILL its process group at a moment of the next kind, restart, until it exits by itself
    or the kill budget is spent (then it runs to the end). Returns the number of kills."""
    kills = 0
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    err_path = out_dir.with_name(out_dir.name + ".stderr")  # a file, not a pipe: an orphan cannot hold it open
    while True:
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd_fn(), stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env,
                                    start_new_session=True)
        kind = KINDS[(first_kind + kills) % len(KINDS)]
        try:
            if kills < kills_left and wait_for_kill_moment(proc, out_dir, kind, rng, timing, rounds):
                kill_all(proc)
                proc.wait()
                kills += 1
                kinds[kind] += 1
                log(f"  kill {kills} ({kind})")
                continue
            proc.wait()
        finally:
            kill_all(proc)  # whatever the attempt left behind (a rank, a Ray worker)
        if proc.returncode != 0:
            raise RuntimeError(f"run failed (exit {proc.returncode}): {err_path.read_text()[-2000:]}")
        return kills


def main(argv=None) -> tuple[int, int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int_at_least(1), default=20, help="total SIGKILLs to survive")
    p.add_argument("--kills-per-run", type=int_at_least(1), default=5)
    p.add_argument("--engine", choices=("inprocess", "torchrun", "flower_sim"), default="inprocess")
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--rounds", type=int_at_least(2), default=6)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--workdir", default=None)
    argv, extra = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))

    ref = work / "reference"
    t0 = time.perf_counter()
    subprocess.run(command(args.engine, args.config, ref, args.rounds, extra), check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    total = time.perf_counter() - t0
    per_round = sum(json.loads(ln).get("seconds", 0) for ln in (ref / "log.jsonl").read_text().splitlines())
    timing = {"round": per_round / args.rounds, "startup": max(0.5, total - per_round)}
    reference = final_state(ref)
    print(f"reference run ({args.engine}): {total:.1f} s, of which start-up and evaluation {timing['startup']:.1f} s "
          f"and {timing['round']:.2f} s a round")

    survived, mismatches, log_errors, trial, kinds = 0, 0, 0, 0, Counter()
    while survived < args.kills:
        trial += 1
        out = work / f"trial{trial}"
        budget = min(args.kills_per_run, args.kills - survived)
        k = run_to_completion(lambda: command(args.engine, args.config, out, args.rounds, extra), out, rng, timing,
                              args.rounds, budget, kinds, print, first_kind=trial)
        survived += k
        same = same_state(final_state(out), reference)
        mismatches += not same
        rounds = log_rounds(out)
        log_ok = rounds == list(range(args.rounds + 1))
        log_errors += not log_ok
        print(f"trial {trial}: {k} kills, end state (weights, client and server state) {'identical' if same else 'DIFFERENT'}, "
              f"log {'one record per round' if log_ok else f'WRONG rounds {rounds}'}")
    print("kills by kind: " + ", ".join(f"{kind} {kinds[kind]}" for kind in KINDS))
    print(f"{survived} kills survived, {mismatches} state mismatches, {log_errors} log errors")
    return survived, mismatches + log_errors


if __name__ == "__main__":
    s, m = main()
    sys.exit(1 if m else 0)
