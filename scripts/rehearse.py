"""A rehearsal of a paper config at full size: the data build, one federated round on a few clients, and the timed
local steps of each modality, every figure measured, in one process per run (so its peak memory is its own).

    python scripts/rehearse.py configs/cifar10_esc50_resnet18.yaml --data.image_root=~/standins/cifar10 \\
        --data.audio_root=~/standins/esc50 --fresh-cache
    python scripts/rehearse.py configs/default.yaml --tiers device host disk     # each tier, and its cost vs device

It prints one Markdown row and writes --json: cache build seconds (with --fresh-cache the decode from the files is
measured, else a warm cache's load), the tier chosen and the line auto would print, bytes of samples held on the
device, peak host RSS after the build and after the rounds, peak device memory (CUDA), seconds per local step per
modality (median of --steps after one warm-up step, on the client holding the most of that modality), the last
round's measured seconds on --clients clients (--rounds of them), and an ESTIMATE of the paper config's round (its
clients_per_round x the measured seconds per client) and of its whole run (x fed.rounds). No evaluation is run.
Stand-ins of the paper datasets: scripts/standins.py.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import residency  # noqa: E402
import runtime  # noqa: E402
from catalog import load_data  # noqa: E402
from engine import Clients, PretrainConfig, train_one_round  # noqa: E402
from local_update import local_ssl_update, lr_at  # noqa: E402
from settings import int_at_least, load_config, split_overrides  # noqa: E402
from strategies import make_strategy  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(clients: Clients, m: str, steps: int) -> float | None:
    """Median seconds of one local step on `m` alone, on the client holding the most `m` samples (a warm-up step
    first; tiers gather that client's samples as in a round, outside the timing)."""
    holders = [c for c in range(len(clients.clients)) if m in clients.clients[c]]
    if not holders:
        return None
    cid = max(holders, key=lambda c: len(clients.clients[c][m]))
    data, idx = clients.client_data(cid)
    cfg, dev = clients.cfg, clients.device
    g = runtime.make_generator(dev, cfg.run.seed, "rehearsal", m)
    times = []
    for i in range(steps + 1):
        sync(dev)
        t0 = time.perf_counter()
        local_ssl_update(clients.model, clients.optimizer, clients.scaler, data, {m: idx[m]}, clients.settings,
                         lr_at(1, cfg.optim, cfg.fed.rounds), g, max_steps=1)
        sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rehearse(cfg: PretrainConfig, k: int, steps: int, n_rounds: int = 1) -> dict:
    device = runtime.resolve_device(cfg.run.device)
    runtime.seed_everything(cfg.run.seed, runtime.deterministic_on(cfg.run.deterministic, device), device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    paper_k, rounds = cfg.fed.clients_per_round, cfg.fed.rounds
    cfg.fed.clients_per_round = min(k, cfg.fed.clients)
    t0 = time.perf_counter()
    data = load_data(cfg.data, device, progress=cfg.run.progress)
    out = {"build_s": round(time.perf_counter() - t0, 1), "rss_after_build_gib": round(peak_rss_gib(), 2),
           "tier": next(iter(data.values())).residency, "device": str(device),
           "samples": {m: len(md.train_y) + len(md.test_y) for m, md in data.items()},
           "sample_gib": round(sum(md.train_x.nbytes + md.test_x.nbytes for md in data.values()) / 2**30, 3),
           "on_device_gib": round(sum(md.train_x.nbytes + md.test_x.nbytes for md in data.values()
                                      if md.residency == "device") / 2**30, 3)}
    need = sum(md.train_x.nbytes + md.test_x.nbytes for md in data.values())
    out["auto"] = residency.choose(need, device, "auto", cfg.data.device_budget_gb, cfg.data.host_budget_gb)[1]
    clients = Clients(cfg, device, data=data)
    state = {k_: v.detach().clone() for k_, v in clients.model.state_dict().items()}
    out["step_s"] = {m: round(s, 3) for m in data if (s := step_seconds(clients, m, steps)) is not None}
    clients.model.load_state_dict(state)
    strategy = make_strategy(cfg.fed, {n for n, _ in clients.model.named_parameters()})
    secs = []
    for r in range(1, n_rounds + 1):
        state, rec = train_one_round(r, clients, state, {}, strategy)
        sync(device)
        secs.append(rec["seconds"])
    active = len(rec["clients"]) - len(rec.get("sat_out", []))
    out |= {"round_s": secs[-1], "rounds_s": secs, "round_clients": active, "round_steps": rec["steps"],
            "rss_peak_gib": round(peak_rss_gib(), 2)}
    if device.type == "cuda":
        out["device_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    per_client = rec["seconds"] / max(1, active)
    out["estimate_round_s"] = round(per_client * paper_k, 1)
    out["estimate_run_h"] = round(per_client * paper_k * rounds / 3600, 1)
    return out


def row(name: str, r: dict) -> str:
    steps = ", ".join(f"{m} {s:.3f}" for m, s in r["step_s"].items())
    return (f"| {name} | {r['build_s']} | {r['tier']} | {r['sample_gib']} | {r['on_device_gib']} | "
            f"{r['rss_after_build_gib']} / {r['rss_peak_gib']} | {r.get('device_peak_gib', '-')} | {steps} | "
            f"{r['round_s']} ({r['round_clients']} clients) | {r['estimate_round_s']} / {r['estimate_run_h']} |")


HEADER = ("| config | build s | tier | samples GiB | on device GiB | peak RSS GiB (build / round) | device peak GiB | "
          "s per local step | round s (measured) | ESTIMATE: paper round s / run h |\n" + "|---" * 10 + "|")


def compare_tiers(argv: list[str], tiers: list[str], repeats: int) -> None:
    """Each tier in its own process on the same config, `repeats` times interleaved; a tier's round cost is the
    median over its processes of their median round, as a ratio to the device tier's."""
    got = {t: [] for t in tiers}
    for _ in range(repeats):
        for t in tiers:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([sys.executable, __file__, *argv, f"--data.residency={t}", "--json", f.name], check=True,
                               stdout=subprocess.DEVNULL)
                got[t].append(json.loads(Path(f.name).read_text()))
    print(HEADER)
    for t in tiers:
        for r in got[t]:
            print(row(t, r))
    cost = {t: statistics.median(statistics.median(r["rounds_s"]) for r in got[t]) for t in tiers}
    rss = {t: statistics.median(r["rss_peak_gib"] for r in got[t]) for t in tiers}
    base = "device" if "device" in tiers else tiers[0]
    for t in tiers:
        print(f"{t}: median round {cost[t]:.3f} s = {cost[t] / cost[base]:.3f}x the {base} tier's; peak RSS "
              f"{rss[t]:.2f} GiB = {rss[t] / rss[base]:.2f}x")


def without(argv: list[str], flags: dict[str, int]) -> list[str]:
    """argv less each flag of `flags` and the number of values it takes (`--flag=value` is one item)."""
    out, skip = [], 0
    for x in argv:
        if skip:
            skip -= 1
        elif x in flags:
            skip = flags[x]
        elif x.split("=", 1)[0] not in flags:
            out.append(x)
    return out


def parse_args(argv: list[str]):
    """(options, the config's dotted overrides)."""
    args, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--clients", type=int_at_least(1), default=2, help="clients in the rehearsed round")
    p.add_argument("--steps", type=int_at_least(1), default=3, help="timed local steps per modality")
    p.add_argument("--rounds", type=int_at_least(1), default=1, help="rounds rehearsed (the last one's seconds are reported)")
    p.add_argument("--fresh-cache", action="store_true", help="build the caches in a temp folder (measures decoding)")
    p.add_argument("--tiers", nargs="*", choices=["device", "host", "disk"], help="rehearse each tier and compare")
    p.add_argument("--repeats", type=int_at_least(1), default=1, help="--tiers: processes per tier, interleaved")
    p.add_argument("--json", type=Path)
    return p.parse_args(args), overrides


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    a, overrides = parse_args(argv)
    if a.tiers:
        return compare_tiers(without(argv, {"--tiers": len(a.tiers), "--repeats": 1}), a.tiers, a.repeats)
    with tempfile.TemporaryDirectory(prefix="rehearse-") as tmp:
        extra = [f"--data.cache_dir={tmp}"] if a.fresh_cache else []
        cfg = load_config(PretrainConfig, a.config, [*overrides, *extra, "--run.progress=false"])
        r = rehearse(cfg, a.clients, a.steps, a.rounds)
    print(HEADER)
    print(row(Path(a.config).stem, r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    runtime.run_main(main)
