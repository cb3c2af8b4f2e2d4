"""The paper's comparison tables on the default data, over several seeds, from one command.

    python tables.py                                   # configs/tables_cpu.yaml, seeds 0 1 2 -> results/tables/
    python tables.py --config configs/default.yaml --seeds 0 1 2 --out results/default_tables

For each seed it pretrains FSSUAVL (one model, both modalities), the image-only and the audio-only models
(the separate-model baseline, same pipeline), evaluates each with finetune.py, and evaluates the random-init
network. It then writes, under --out:
- tables.md: everything below, pasteable into a paper;
- table1_image.csv, table2_audio.csv, table3_paired.csv, table4_efficiency.csv;
- knn_curves.png, partition.png (with matplotlib installed).
Finished runs and evaluations are reused, so an interrupted command picks up where it stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

import finetune
import pretrain
import runtime
from models import build_model, count_params

VARIANTS = {"fssuavl": ["image", "audio"], "image_only": ["image"], "audio_only": ["audio"]}
LABELS = {"fssuavl": "FSSUAVL (one model)", "image_only": "image-only model", "audio_only": "audio-only model",
          "random_init": "random init"}
EVAL_ARGS = ["--eval.protocols=[linear, knn]", "--eval.label_fractions=[0.01, 0.1, 1.0]"]


def mean_std(values: list[float]) -> str:
    """'mean ± std' with the sample standard deviation (n-1); a single value is marked n=1."""
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# ----------------------------------------------------------------------------- running the grid

def ensure_pretrained(config: str, run_dir: Path, seed: int, modalities: list[str], extra: list[str]) -> Path:
    ckpt = run_dir / "last.pt"
    args = [config, f"--run.out_dir={run_dir}", f"--run.seed={seed}", f"--data.modalities={modalities}", *extra]
    cfg = runtime.load_config(pretrain.PretrainConfig, config, args[1:])
    if ckpt.exists():
        if runtime.load_checkpoint(ckpt)["round"] >= cfg.fed.rounds:
            return ckpt
        pretrain.main(["--resume", str(run_dir), *[a for a in args[1:] if a.startswith("--run.progress")]])
    else:
        pretrain.main(args)
    return ckpt


def ensure_evaluated(ckpt: Path, out_dir: Path, seed: int, random_init: bool, extra: list[str]) -> dict:
    path = out_dir / ("results_random_init.json" if random_init else "results.json")
    if path.exists():
        return json.loads(path.read_text())
    args = ["--ckpt", str(ckpt), f"--run.out_dir={out_dir}", f"--run.seed={seed}", *EVAL_ARGS, *extra]
    return finetune.main(args + (["--random-init"] if random_init else []))


# ----------------------------------------------------------------------------- tables

def accuracy_table(results: dict[str, list[dict]], task: str, features: str, variants: list[str]) -> list[dict]:
    """Rows of (model, protocol, label fraction) -> mean ± std over seeds of one task's accuracy.
    `results` maps a variant to its per-seed results.json objects."""
    rows = []
    for v in variants:
        per_seed = results.get(v, [])
        if not per_seed:
            continue
        for proto in ("linear", "knn"):
            row = {"model": LABELS[v], "protocol": proto, "seeds": " ".join(str(r["seed"]) for r in per_seed),
                   "config": per_seed[0].get("config_name", "")}
            for frac in (0.01, 0.1, 1.0):
                vals = [x["acc"] for r in per_seed for x in r["rows"] if x["task"] == task and
                        x["features"] == features and x["protocol"] == proto and x["label_frac"] == frac]
                if len(vals) == len(per_seed):
                    row[f"{frac:.0%} labels"] = mean_std(vals)
            if len(row) > 4:
                rows.append(row)
    return rows


def paired_table(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    per_seed = results.get("fssuavl", [])
    for feats in ("image", "audio", "fused"):
        for proto in ("linear", "knn"):
            row = {"features": {"image": "image alone", "audio": "audio alone", "fused": "fused (image + audio)"}[feats],
                   "protocol": proto, "seeds": " ".join(str(r["seed"]) for r in per_seed)}
            for frac in (0.01, 0.1, 1.0):
                vals = [x["acc"] for r in per_seed for x in r["rows"] if x["task"] == "paired" and
                        x["features"] == feats and x["protocol"] == proto and x["label_frac"] == frac]
                if vals and len(vals) == len(per_seed):
                    row[f"{frac:.0%} labels"] = mean_std(vals)
            if len(row) > 3:
                rows.append(row)
    return rows


def flops_per_sample(model, modality: str, shape) -> int:
    """Forward FLOPs of backbone + projection head for one sample (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    x = torch.zeros(2, *shape)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, modality)
    return fc.get_total_flops() // 2


def efficiency_table(cfg: pretrain.PretrainConfig, shapes: dict[str, tuple]) -> list[dict]:
    """Parameters, FLOPs per image and per clip, and bytes a client uploads per round (the state dict the
    server averages, fp32): one FSSUAVL model vs two separate models. Each federation samples K clients per
    round; downloads are the same size as uploads."""
    K = cfg.fed.clients_per_round
    models = {v: build_model(cfg.model, {m: shapes[m] for m in mods}) for v, mods in VARIANTS.items()}

    def nbytes(m):
        return sum(t.numel() * t.element_size() for k, t in m.state_dict().items()
                   if pretrain.is_shared(k, cfg.fed.share_head) and t.is_floating_point())
    f, i, a = models["fssuavl"], models["image_only"], models["audio_only"]
    rows = [
        {"setup": "FSSUAVL: one model", "parameters": count_params(f),
         "GFLOPs/image": flops_per_sample(f, "image", shapes["image"]) / 1e9,
         "GFLOPs/clip": flops_per_sample(f, "audio", shapes["audio"]) / 1e9,
         "MB up per client per round": nbytes(f) / 1e6, "MB up per round (all clients)": K * nbytes(f) / 1e6},
        {"setup": "two models: image + audio", "parameters": count_params(i) + count_params(a),
         "GFLOPs/image": flops_per_sample(i, "image", shapes["image"]) / 1e9,
         "GFLOPs/clip": flops_per_sample(a, "audio", shapes["audio"]) / 1e9,
         "MB up per client per round": f"{nbytes(i) / 1e6:.3f} (image) / {nbytes(a) / 1e6:.3f} (audio) / "
                                       f"{(nbytes(i) + nbytes(a)) / 1e6:.3f} (both)",
         "MB up per round (all clients)": K * (nbytes(i) + nbytes(a)) / 1e6},
    ]
    rows.append({"setup": "ratio FSSUAVL / two models", "parameters": rows[0]["parameters"] / rows[1]["parameters"],
                 "GFLOPs/image": rows[0]["GFLOPs/image"] / rows[1]["GFLOPs/image"],
                 "GFLOPs/clip": rows[0]["GFLOPs/clip"] / rows[1]["GFLOPs/clip"],
                 "MB up per client per round": nbytes(f) / (nbytes(i) + nbytes(a)),
                 "MB up per round (all clients)": rows[0]["MB up per round (all clients)"] /
                 rows[1]["MB up per round (all clients)"]})
    return rows


def to_markdown(rows: list[dict], title: str) -> str:
    if not rows:
        return f"### {title}\n\n(no results)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"
        return "" if v is None else str(v)
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------- plots

def plot_knn_curves(run_dirs: dict[str, list[Path]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping knn_curves.png")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"fssuavl": "C0", "image_only": "C1", "audio_only": "C2"}
    for ax, m in zip(axes, ("image", "audio")):
        for v, dirs in run_dirs.items():
            for j, d in enumerate(dirs):
                log = [json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines() if ln.strip()]
                pts = [(r["round"], r[f"knn_{m}"]) for r in log if f"knn_{m}" in r]
                if pts:
                    ax.plot(*zip(*pts), color=colors[v], alpha=0.8, marker=".", label=LABELS[v] if j == 0 else None)
        ax.set_title(f"kNN accuracy, {m}")
        ax.set_xlabel("round")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_partition(config: str, seed: int, overrides: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping partition.png")
        return False
    import numpy as np
    from data import load_data
    cfg = runtime.load_config(pretrain.PretrainConfig, config, [*overrides, f"--run.seed={seed}"])
    data = load_data(cfg.data, torch.device("cpu"), progress=False)
    clients = pretrain.make_clients(cfg, data)
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for ax, (m, md) in zip(axes, data.items()):
        y = md.train_y.numpy()
        counts = np.array([np.bincount(y[c[m]], minlength=len(md.classes)) if m in c else
                           np.zeros(len(md.classes), int) for c in clients])
        bottom = np.zeros(len(clients))
        cmap = plt.get_cmap("tab20")
        for k in range(len(md.classes)):
            ax.bar(range(len(clients)), counts[:, k], bottom=bottom, color=cmap(k % 20), width=0.85,
                   label=md.classes[k])
            bottom += counts[:, k]
        ax.set_ylabel(f"{m} samples")
        ax.set_title(f"{m}: per-client class counts (clients without {m} are empty)")
        ax.legend(ncol=10, fontsize=6, loc="upper right")
    axes[-1].set_xlabel("client")
    axes[-1].set_xticks(range(len(clients)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tables_cpu.yaml", help="pretraining config for every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="results/tables")
    p.add_argument("--eval", nargs="*", default=[], metavar="--eval.key=value",
                   help="extra finetune.py overrides, e.g. --eval --eval.probe_iters=50")
    argv, overrides = runtime.split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(argv)
    eval_extra = [o for o in overrides if o.startswith(("--eval.", "--data."))] + args.eval
    pre_extra = [o for o in overrides if not o.startswith("--eval.")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = runtime.Timer()
    config_name = Path(args.config).name

    results: dict[str, list[dict]] = {v: [] for v in [*VARIANTS, "random_init"]}
    run_dirs: dict[str, list[Path]] = {v: [] for v in VARIANTS}
    for seed in args.seeds:
        for v, mods in VARIANTS.items():
            rd = out / "runs" / f"{v}_seed{seed}"
            ckpt = ensure_pretrained(args.config, rd, seed, mods, pre_extra)
            res = ensure_evaluated(ckpt, rd, seed, False, eval_extra)
            results[v].append({**res, "config_name": config_name})
            run_dirs[v].append(rd)
        rd = out / "runs" / f"random_init_seed{seed}"
        res = ensure_evaluated(out / "runs" / f"fssuavl_seed{seed}" / "last.pt", rd, seed, True, eval_extra)
        results["random_init"].append({**res, "config_name": config_name})

    cfg = runtime.load_config(pretrain.PretrainConfig, args.config, pre_extra)
    shapes = {m: tuple(s) for m, s in runtime.load_checkpoint(run_dirs["fssuavl"][0] / "last.pt")["input_shapes"].items()}
    n = len(args.seeds)
    tables = {
        "table1_image": (f"Table 1: image task (Fashion-MNIST test), accuracy %, mean ± std over {n} seeds",
                         accuracy_table(results, "image", "image", ["fssuavl", "image_only", "random_init"])),
        "table2_audio": (f"Table 2: audio task (20 spoken words, held-out voices), accuracy %, mean ± std over {n} seeds",
                         accuracy_table(results, "audio", "audio", ["fssuavl", "audio_only", "random_init"])),
        "table3_paired": (f"Table 3: paired task (image + spoken class name), one FSSUAVL model, accuracy %, "
                          f"mean ± std over {n} seeds", paired_table(results)),
        "table4_efficiency": ("Table 4: efficiency, FSSUAVL vs two separate models", efficiency_table(cfg, shapes)),
    }
    md = [f"# FSSUAVL comparison tables\n\nConfig `{args.config}`, seeds {args.seeds}, "
          f"probe: {', '.join(EVAL_ARGS)}. Generated by `python tables.py --config {args.config} "
          f"--seeds {' '.join(map(str, args.seeds))}`.\n"]
    for name, (title, rows) in tables.items():
        for r in rows:
            r.setdefault("config", config_name)
        to_csv(rows, out / f"{name}.csv")
        md.append(to_markdown(rows, title))
    plot_knn_curves(run_dirs, out / "knn_curves.png")
    plot_partition(args.config, args.seeds[0], pre_extra, out / "partition.png")
    text = "\n".join(md)
    (out / "tables.md").write_text(text)
    print(text)
    print(f"tables in {out}/ ({t() / 60:.1f} min)")
    return {"tables": tables, "results": results}


if __name__ == "__main__":
    main()
