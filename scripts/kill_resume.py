"""Kill pretraining runs with SIGKILL, resume each after every kill, and compare the final global weights with
an uninterrupted run of the same seed (deterministic mode, CPU).

    python scripts/kill_resume.py --kills 30
    python scripts/kill_resume.py --kills 5 --config configs/smoke.yaml --rounds 8 --data.n_voices=12

Kill moments cycle through three kinds: `random` (uniform over a run's length), `early` (inside round 0/1:
while the random init is evaluated or the first clients train) and `ckpt` (while a checkpoint is being
written: the run is told to pause FSSUAVL_TEST_CKPT_DELAY seconds between writing last.pt.tmp and renaming
it, and is killed inside that window). After every run it checks that log.jsonl holds exactly one record per
round. Any --section.key=value argument is passed on to pretrain.py. Prints "N kills survived, M weight
mismatches, L log errors" and exits non-zero on any mismatch or log error.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from settings import split_overrides  # noqa: E402


def command(config: str, out_dir: Path, rounds: int, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain.py"), config, "--resume", f"--run.out_dir={out_dir}",
            f"--fed.rounds={rounds}", "--run.deterministic=true", "--run.device=cpu", "--run.threads=2",
            "--run.progress=false", "--run.eval_every=0", *extra]


def final_weights(out_dir: Path) -> dict:
    return torch.load(out_dir / "last.pt", weights_only=True)["model"]


def log_rounds(out_dir: Path) -> list[int]:
    return [json.loads(ln)["round"] for ln in (out_dir / "log.jsonl").read_text().splitlines() if ln.strip()]


KINDS = ("random", "early", "ckpt")


def wait_for_kill_moment(proc, out_dir: Path, kind: str, rng: random.Random, run_seconds: float) -> bool:
    """Block until the moment to kill `proc` (True), or until it exits by itself (False)."""
    t0 = time.perf_counter()
    if kind == "random":
        deadline = t0 + rng.uniform(0.2, run_seconds)
        cond = lambda: time.perf_counter() >= deadline  # noqa: E731
    elif kind == "early":  # round 0 is logged, round 1 is not yet: inside the first round
        extra = rng.uniform(0.0, 0.5)
        seen = {}

        def cond():
            log = out_dir / "log.jsonl"
            if "t" not in seen and log.exists() and log.read_text().strip():
                seen["t"] = time.perf_counter()
            return "t" in seen and time.perf_counter() >= seen["t"] + extra
    else:  # inside a checkpoint write
        cond = lambda: (out_dir / "last.pt.tmp").exists()  # noqa: E731
    while proc.poll() is None:
        if cond():
            return True
        time.sleep(0.002)
    return False


def run_to_completion(cmd: list[str], out_dir: Path, rng: random.Random, run_seconds: float, kills_left: int,
                      log, first_kind: int = 0) -> int:
    """Start `cmd`, SIGKILL it at a moment of the next kind, restart, until it exits by itself or the kill
    budget is spent (then it runs to the end). Returns the number of kills."""
    kills = 0
    env = {**os.environ, "FSSUAVL_TEST_CKPT_DELAY": "0.3"}
    while True:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        kind = KINDS[(first_kind + kills) % len(KINDS)]
        if kills < kills_left and wait_for_kill_moment(proc, out_dir, kind, rng, run_seconds):
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            log(f"  kill {kills} ({kind})")
            continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"run failed (exit {proc.returncode}): {err.decode()[-2000:]}")
        return kills


def main(argv=None) -> tuple[int, int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="total SIGKILLs to survive")
    p.add_argument("--kills-per-run", type=int, default=5)
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--workdir", default=None)
    argv, extra = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(argv)
    args.extra = extra
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))

    ref = work / "reference"
    t0 = time.perf_counter()
    subprocess.run(command(args.config, ref, args.rounds, args.extra), check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    ref_seconds = time.perf_counter() - t0
    reference = final_weights(ref)
    print(f"reference run: {ref_seconds:.1f}s; killing at uniform(0.2, {ref_seconds:.1f})s")

    survived, mismatches, log_errors, trial = 0, 0, 0, 0
    while survived < args.kills:
        trial += 1
        out = work / f"trial{trial}"
        budget = min(args.kills_per_run, args.kills - survived)
        k = run_to_completion(command(args.config, out, args.rounds, args.extra), out, rng, ref_seconds, budget, print,
                              first_kind=trial)
        survived += k
        w = final_weights(out)
        same = w.keys() == reference.keys() and all(torch.equal(w[n], reference[n]) for n in w)
        mismatches += not same
        rounds = log_rounds(out)
        log_ok = rounds == list(range(args.rounds + 1))
        log_errors += not log_ok
        print(f"trial {trial}: {k} kills, final weights {'identical' if same else 'DIFFERENT'}, "
              f"log {'one record per round' if log_ok else f'WRONG rounds {rounds}'}")
    print(f"{survived} kills survived, {mismatches} weight mismatches, {log_errors} log errors")
    return survived, mismatches + log_errors


if __name__ == "__main__":
    s, m = main()
    sys.exit(1 if m else 0)
