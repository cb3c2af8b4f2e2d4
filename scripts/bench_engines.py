"""What each engine costs: the same federated work in process, under Flower's Simulation Engine, under torchrun and
in Flower deployments on 127.0.0.1, in one run, with wall time and the ratio to in-process.

    python scripts/bench_engines.py                                   # configs/tables_cpu.yaml, 3 rounds -> results/bench_engines.json
    python scripts/bench_engines.py --config configs/default.yaml --rounds 5 --nproc 2 --repeats 2
    python scripts/bench_engines.py --config configs/smoke.yaml --rounds 5 --repeats 2 --engines inprocess flower_sim \
        torchrun flower_deploy flower_deploy_cold flower_nodes       # deployed rounds (docs/performance.md)
    python scripts/bench_engines.py --config configs/smoke.yaml --rounds 5 --repeats 3 \
        --engines flower_deploy_insecure flower_deploy                # what TLS + node authentication cost

Deployments (TLS and node authentication, as deployed): flower_deploy is partitioned over --nproc warm SuperNodes
(fedengines/flower_exec.py), flower_deploy_insecure the same in plaintext with any node admitted, flower_deploy_cold over
Flower's own, flower_nodes node-local with one warm SuperNode per client of the partition, holding that client's
number of (synthetic) images and clips: the same work, other values, so other weights. For Flower engines the mean
of what a ClientApp spent on its start, its data and its training is printed beside the times.

Same work means the same config, seed, N, K, rounds, model and data; only the engine differs. Each engine gets the
same cores: in process, one process with --threads threads; torchrun, --nproc ranks with threads // nproc each;
Flower, --nproc virtual SuperNodes (one ClientApp at a time each, threads // nproc threads) beside a ServerApp
that trains nothing. Two times per engine: `wall` (the whole command: start-up, data load, Ray or the process
group, the evaluations) and `rounds` (the sum of the rounds' own `seconds` in log.jsonl: sampling, training, the
fold, and for Flower the messages). Evaluation is off but for the kNN after the last round (the same everywhere).
The final weights are compared with the in-process run's as ||w - w_inprocess|| / ||w_inprocess||, and the engines
whose weights are equal bit for bit are listed. Bits match only at equal thread counts per process
(tests/test_engines.py checks that): here the in-process run has all threads and each rank or ClientApp a
share, and a reduction over a different number of threads rounds differently, which training then amplifies
(in process alone, 1 thread against 2 gives a difference of the same size). On CUDA, torchrun uses NCCL, one GPU per rank,
and Flower's clients ask for --client-gpus each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedengines.localhost import LocalDeployment, free_port  # noqa: E402
from settings import int_at_least  # noqa: E402



def commands(engine: str, base: list[str], out: Path, args) -> list[str]:
    per = max(1, args.threads // args.nproc)
    if engine == "inprocess":
        return [sys.executable, "pretrain.py", *base, f"--run.threads={args.threads}", f"--run.out_dir={out}"]
    if engine == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={args.nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "pretrain.py", *base,
                f"--run.threads={per}", f"--run.out_dir={out}"]
    if engine == "flower_sim":
        return [sys.executable, "-m", "fedengines.flower_app", f"--supernodes={args.nproc}", f"--client-cpus={per}",
                f"--client-gpus={args.client_gpus}", *base, f"--run.threads={per}", f"--run.out_dir={out}"]
    raise ValueError(engine)


DEPLOYED = ("flower_deploy", "flower_deploy_insecure", "flower_deploy_cold", "flower_nodes")


def node_folders(base: list[str], work: Path) -> list[Path]:
    """flower_nodes: one data folder per client of the config's partition, holding as many (synthetic) images and
    clips as that client: the same samples per client, steps and batches as the other engines, other pixel values."""
    from catalog import load_data
    from engine import PretrainConfig, make_clients
    from fedengines.nodes import load_node_local_config, write_demo_node
    from settings import load_config
    cfg = load_config(PretrainConfig, base[0], base[1:])
    parts = make_clients(cfg, load_data(cfg.data, "cpu", progress=False))
    data = load_node_local_config(base[0], base[1:]).data
    return [write_demo_node(work / "nodes" / f"client{i}", data, len(c.get("image", ())), len(c.get("audio", ())), i)
            for i, c in enumerate(parts)]


def deployed(engine: str, base: list[str], out: Path, args, roots: list[Path]) -> subprocess.CompletedProcess:
    """A localhost deployment (fedengines.localhost.LocalDeployment), TLS and node authentication unless _insecure:
    partitioned over --nproc SuperNodes (warm, or Flower's own with _cold), or node-local with one SuperNode per
    client folder."""
    per = max(1, args.threads // args.nproc)
    local = engine == "flower_nodes"
    with LocalDeployment(out.parent / f"{engine}_logs", insecure=engine.endswith("_insecure")) as d:
        for i in range(len(roots) if local else args.nproc):
            d.add_node(roots[i] if local else None, warm=engine != "flower_deploy_cold")
        run = d.run(Path(base[0]).resolve(), [*base[1:], f"--run.threads={per}", f"--run.out_dir={out}"],
                    **({"mode": "node-local"} if local else {}), **{"min-nodes": len(d.nodes)})
        rc = run.wait()
        text = (d.logs / "flwr_run.log").read_text()
    done = (out / "last.pt").exists() and torch.load(out / "last.pt", weights_only=True)["round"] > 0
    if not done:  # flwr run exits 0 when the ServerApp fails
        rc = rc or 1
    return subprocess.CompletedProcess([engine], rc, text, "")


def run_one(engine: str, base: list[str], out: Path, args, roots=()) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // args.nproc)), "GLOO_SOCKET_IFNAME": "lo"}
    t0 = time.perf_counter()
    if engine in DEPLOYED:
        p = deployed(engine, base, out, args, roots)
    else:
        p = subprocess.run(commands(engine, base, out, args), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{engine} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["round"] >= 1]
    out = {"wall_s": wall, "rounds_s": sum(r["seconds"] for r in rounds), "rounds": len(rounds)}
    parts = [r["clientapp_s"] for r in rounds if "clientapp_s" in r]
    if parts:  # Flower: what a ClientApp spent on its start, its data and its training, mean over the rounds
        out["clientapp_s"] = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tables_cpu.yaml")
    p.add_argument("--rounds", type=int_at_least(1), default=3)
    p.add_argument("--nproc", type=int_at_least(1), default=2, help="torchrun ranks and Flower SuperNodes")
    p.add_argument("--threads", type=int_at_least(1), default=os.cpu_count() or 1, help="CPU threads in all, per engine")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per Flower ClientApp (CUDA runs)")
    p.add_argument("--repeats", type=int_at_least(1), default=1)
    p.add_argument("--engines", nargs="+", default=["inprocess", "flower_sim", "torchrun"],
                   choices=["inprocess", "flower_sim", "torchrun", *DEPLOYED],
                   help="deployments on 127.0.0.1, TLS + node authentication: flower_deploy (partitioned, --nproc warm "
                        "SuperNodes of fedengines/flower_exec.py), flower_deploy_insecure (the same in plaintext, any "
                        "node admitted), flower_deploy_cold (Flower's own SuperNodes), flower_nodes (node-local: "
                        "one warm SuperNode per client, holding that client's number of samples)")
    p.add_argument("--out", default="results/bench_engines.json")
    p.add_argument("overrides", nargs="*", help="more --key=value overrides for every engine (after --)")
    args = p.parse_args(argv)
    base = [args.config, f"--fed.rounds={args.rounds}", "--run.eval_every=0", "--run.final_probe=false",
            "--run.progress=false", *args.overrides]
    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    res = {e: [] for e in args.engines}
    try:
        roots = node_folders(base, work) if "flower_nodes" in args.engines else []
        for rep in range(args.repeats):  # engines interleaved, so a slow spell of the machine hits them alike
            for e in args.engines:
                r = run_one(e, base, work / e, args, roots)
                res[e].append(r)
                parts = ", ".join(f"{k} {v:.2f} s" for k, v in r.get("clientapp_s", {}).items())
                print(f"repeat {rep + 1}/{args.repeats} {e}: wall {r['wall_s']:.1f} s, rounds {r['rounds_s']:.1f} s"
                      + (f" (a ClientApp's mean: {parts})" if parts else ""), flush=True)
        final = {e: torch.load(work / e / "last.pt", weights_only=True)["model"] for e in args.engines}
        ref = final[args.engines[0]]
        keys = [k for k in ref if ref[k].is_floating_point()]
        same, equal = {}, {}
        for e, w in final.items():
            num = sum((w[k].double() - ref[k].double()).pow(2).sum().item() for k in keys)
            same[e] = (num / sum(ref[k].double().pow(2).sum().item() for k in keys)) ** 0.5
            equal[e] = [o for o, v in final.items() if o != e and all(torch.equal(w[k], v[k]) for k in w)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_e = args.engines[0]
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "rounds_s")} for e, rs in res.items()}
    print(f"\n{args.config}, {args.rounds} rounds, {args.threads} threads per engine, {args.nproc} ranks / SuperNodes, "
          f"median of {args.repeats}; ratio = engine time / {base_e} time")
    print(f"| engine | wall s | wall ratio | rounds s | rounds ratio | weights: relative L2 diff vs {base_e} | bit-equal to |")
    print("|---|---|---|---|---|---|---|")
    for e in args.engines:
        m = med[e]
        print(f"| {e} | {m['wall_s']:.1f} | {m['wall_s'] / med[base_e]['wall_s']:.2f} | {m['rounds_s']:.1f} | "
              f"{m['rounds_s'] / med[base_e]['rounds_s']:.2f} | {same[e]:.3g} | {', '.join(equal[e]) or '-'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "rounds": args.rounds, "threads": args.threads,
                               "nproc": args.nproc, "runs": res, "median": med, "relative_l2_weight_diff": same, "bit_equal_to": equal,
                               "device": "cuda" if torch.cuda.is_available() else "cpu"}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
