"""Digests of the final global weights of deterministic pretraining runs: the proof that a refactor changed no bits.

    python scripts/digests.py                    # every case, printed as JSON
    python scripts/digests.py --write            # ... and this platform's record in tests/digests.json (after a
                                                 # deliberate change of numerics: then re-record every platform)
    python scripts/digests.py --engines          # also torchrun (2 gloo ranks) and the Flower simulation

Each case is a tiny configs/smoke.yaml federation (4 clients, 3 a round, 2 rounds, deterministic, one thread,
fp32) run through the `pretrain.py` command line in a fresh process, one per server strategy, loss composition,
head placement and backbone family. The digest is the sha256 of the final global tensors of last.pt (key order,
dtype, shape, bytes). tests/test_digests.py holds the in-process cases; the engine cases equal the in-process one
by tests/test_engines.py. Bits depend on the torch build and the CPU's instruction set (an AMX machine's oneDNN
kernels round otherwise than an AVX-512-only one's), so digests.json holds one record per platform class, each with
its digests and each floating tensor's norm. Where the running platform has a record the test compares the
digests (exact); elsewhere the parameters' norms against the first record, within NORM_RTOL of max(norm,
NORM_FLOOR) (coarse), so the guard runs on every machine. `--write` adds or replaces the running platform's record: record a new platform from
a commit whose bits a recorded platform has checked, so every record holds the same code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.n_voices=12", "--data.max_train_images=512", "--data.knn_bank=256", "--data.knn_queries=128",
        "--data.n_mels=32", "--data.win_ms=40.0", "--data.hop_ms=20.0"]
BASE = ["configs/smoke.yaml", "--fed.clients=4", "--fed.clients_per_round=3", "--fed.modality_fractions=[0.4,0.4,0.2]",
        "--fed.rounds=2", "--optim.batch_size=32", "--run.threads=1", "--run.deterministic=true", "--run.amp=fp32",
        "--run.progress=false", "--run.final_probe=false", "--run.eval_every=0", "--run.device=cpu", *TINY]
CASES = {
    "fedavg": [],
    "fedprox": ["--fed.aggregation=fedprox", "--fed.strategy.prox_mu=0.01"],
    "fedavgm": ["--fed.aggregation=fedavgm", "--fed.strategy.server_momentum=0.9"],
    "ldawa": ["--fed.aggregation=ldawa"],
    "median": ["--fed.aggregation=median"],
    "trimmed_mean": ["--fed.aggregation=trimmed_mean", "--fed.strategy.trim_frac=0.34"],
    "sum_cross_modal": ["--fed.order=sum", "--fed.cross_modal_negatives=true"],
    "private_heads": ["--model.head=per_modality", "--fed.share_head=false"],
    "paper_plain": ["--fed.weighting=total", "--model.bn_stats=shared", "--model.bn_momentum=0.1"],
    "vit": ["--model.arch=vit_micro", "--model.patch_size=4", "--optim.name=adamw", "--optim.lr=0.001"],
}
ENGINES = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", "--master_port={port}", "pretrain.py"],
           "flower_sim": [sys.executable, "-m", "fedengines.flower_app", "--supernodes=2"]}


def state_digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def platform_key() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in flags]
    return {"torch": torch.__version__.split("+")[0], "machine": platform.machine(), "isa": isa}


def state_norms(state: dict) -> dict[str, float]:
    """Each floating tensor's L2 norm in float64: what the digest test compares, within NORM_RTOL, on a platform
    whose bits differ from the recording one."""
    return {k: float(v.detach().double().norm()) for k, v in sorted(state.items()) if v.is_floating_point()}


NORM_RTOL = 5e-3   # of max(norm, NORM_FLOOR): the parameters of the two recorded platforms (AMX and AVX-512 only) are
NORM_FLOOR = 1.0   # at most 2.7e-3 apart on this scale after 2 rounds (stems.audio.0.weight, fedavgm); a small tensor
                   # (a bias of norm 0.01) moves by far more than 5e-3 of itself from rounding alone, so its slack is
                   # absolute. BatchNorm's running statistics (up to 9% apart across those platforms) are left out:
                   # the fallback is coarse, the exact digest of a recorded platform is the guard.


def norms_off(norms: dict, want: dict) -> dict:
    """The parameters whose norms moved past the tolerance: {name: (got, recorded)}."""
    return {k: (norms.get(k), want[k]) for k in want if "running_" not in k
            and (k not in norms or abs(norms[k] - want[k]) > NORM_RTOL * max(want[k], NORM_FLOOR))}


def read_records(path: Path = ROOT / "tests" / "digests.json") -> list[dict]:
    """digests.json's records, one per platform class: [{platform, digests, norms}, ...]."""
    return json.loads(path.read_text())["records"]


def own_record(records: list[dict]) -> dict | None:
    """The record of the running platform, or None."""
    return next((r for r in records if r["platform"] == platform_key()), None)


def run_case(name: str, cache_dir: str, work: Path, launcher: list[str] | None = None, extra: tuple = (),
             norms: bool = False):
    out = work / name
    cmd = (launcher or [sys.executable, "pretrain.py"]) + BASE + CASES.get(name, []) + list(extra) + \
        [f"--data.cache_dir={cache_dir}", f"--run.out_dir={out}"]
    if launcher and "{port}" in " ".join(launcher):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [c.replace("{port}", str(port)) for c in cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        sys.exit(f"{name} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    return (state_digest(state), state_norms(state)) if norms else state_digest(state)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=os.environ.get("FSSUAVL_CACHE", str(Path.home() / ".cache" / "fssuavl")))
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--engines", action="store_true")
    p.add_argument("--write", action="store_true", help="write tests/digests.json")
    args = p.parse_args(argv)
    out = {"platform": platform_key(), "digests": {}, "norms": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in args.cases:
            out["digests"][name], out["norms"][name] = run_case(name, args.cache_dir, Path(d), norms=True)
            print(f"{name}: {out['digests'][name]}", flush=True)
        for eng, launcher in (ENGINES.items() if args.engines else []):
            out["digests"][f"fedavg@{eng}"] = run_case("fedavg", args.cache_dir, Path(d) / eng, launcher)
            print(f"fedavg@{eng}: {out['digests'][f'fedavg@{eng}']}", flush=True)
    print(json.dumps(out, indent=1))
    if args.write:
        path = ROOT / "tests" / "digests.json"
        records = [r for r in read_records(path) if r["platform"] != out["platform"]] if path.exists() else []
        path.write_text(json.dumps({"records": records + [out]}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
