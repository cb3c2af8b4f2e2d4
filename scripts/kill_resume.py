"""Kill pretraining runs with SIGKILL at random moments, resume each after every kill, and compare the
final global weights with an uninterrupted run of the same seed (deterministic mode, CPU).

    python scripts/kill_resume.py --kills 20
    python scripts/kill_resume.py --kills 5 --config configs/smoke.yaml --rounds 8 --data.n_voices=12

Any --section.key=value argument is passed on to pretrain.py. Prints "N kills survived, M weight mismatches" (M counts resumed runs whose final weights are not
bit-identical to the reference) and exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
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
import runtime  # noqa: E402


def command(config: str, out_dir: Path, rounds: int, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain.py"), config, "--resume", f"--run.out_dir={out_dir}",
            f"--fed.rounds={rounds}", "--run.deterministic=true", "--run.device=cpu", "--run.threads=2",
            "--run.progress=false", "--run.eval_every=0", *extra]


def final_weights(out_dir: Path) -> dict:
    return torch.load(out_dir / "last.pt", weights_only=True)["model"]


def run_to_completion(cmd: list[str], rng: random.Random, max_delay: float, kills_left: int, log) -> int:
    """Start `cmd`, SIGKILL it after a random delay, restart, until it exits by itself or the kill
    budget is spent (then it runs to the end). Returns the number of kills."""
    kills = 0
    while True:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        delay = rng.uniform(0.2, max_delay) if kills < kills_left else None
        try:
            _, err = proc.communicate(timeout=delay)
            if proc.returncode != 0:
                raise RuntimeError(f"run failed (exit {proc.returncode}): {err.decode()[-2000:]}")
            return kills
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            log(f"  kill {kills} after {delay:.2f}s")


def main(argv=None) -> tuple[int, int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="total SIGKILLs to survive")
    p.add_argument("--kills-per-run", type=int, default=5)
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--workdir", default=None)
    argv, extra = runtime.split_overrides(list(sys.argv[1:] if argv is None else argv))
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

    survived, mismatches, trial = 0, 0, 0
    while survived < args.kills:
        trial += 1
        out = work / f"trial{trial}"
        budget = min(args.kills_per_run, args.kills - survived)
        k = run_to_completion(command(args.config, out, args.rounds, args.extra), rng, ref_seconds, budget, print)
        survived += k
        w = final_weights(out)
        same = w.keys() == reference.keys() and all(torch.equal(w[n], reference[n]) for n in w)
        mismatches += not same
        print(f"trial {trial}: {k} kills, final weights {'identical' if same else 'DIFFERENT'}")
    print(f"{survived} kills survived, {mismatches} weight mismatches")
    return survived, mismatches


if __name__ == "__main__":
    s, m = main()
    sys.exit(1 if m else 0)
