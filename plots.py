"""The figures of the tables script: the monitor's curves by round (kNN and probe against the raw-input bar, and
the representation diagnostics) from each run's log.jsonl, and the partition of the first seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from catalog import load_data
from engine import PretrainConfig, make_clients
from settings import load_config

# (log key prefix, panel title, y label); one panel per key and modality
MONITOR_PANELS = [("probe", "linear probe", "top-1 (%)"), ("knn", "kNN (standardised features)", "top-1 (%)"),
                  ("erank", "effective rank of h", "of feat_dim"), ("align", "alignment of two views (lower: closer)", ""),
                  ("unif", "uniformity (lower: more spread)", "")]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def read_log(run_dir: Path) -> list[dict]:
    """The records of a run's log.jsonl (a line cut short by a kill is skipped)."""
    out = []
    for ln in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out


def plot_monitor_curves(run_dirs: dict[str, list[Path]], labels: dict[str, str], path: Path,
                        modalities=("image", "audio")) -> bool:
    """One row per modality, one column per monitor key: every run of every variant by round; on the accuracy
    panels, the raw input's value (logged at round 0) as a dashed line per seed: the bar."""
    plt = _pyplot()
    if plt is None:
        print(f"matplotlib not installed: skipping {path.name}")
        return False
    fig, axes = plt.subplots(len(modalities), len(MONITOR_PANELS), figsize=(4 * len(MONITOR_PANELS), 3.3 * len(modalities)),
                             squeeze=False)
    colors = {v: f"C{i}" for i, v in enumerate(run_dirs)}
    for row, m in zip(axes, modalities):
        for ax, (key, title, ylabel) in zip(row, MONITOR_PANELS):
            for v, dirs in run_dirs.items():
                for j, d in enumerate(dirs):
                    log = read_log(d)
                    pts = [(r["round"], r[f"{key}_{m}"]) for r in log if f"{key}_{m}" in r]
                    if pts:
                        ax.plot(*zip(*pts), color=colors[v], alpha=0.8, marker=".", label=labels[v] if j == 0 else None)
                    raw = next((r[f"raw_{key}_{m}"] for r in log if f"raw_{key}_{m}" in r), None)
                    if raw is not None and pts:
                        ax.axhline(raw, color="k", ls="--", lw=0.8, label="raw input" if (v, j) == (next(iter(run_dirs)), 0) else None)
            ax.set_title(f"{title}, {m}", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_partition(config: str, seed: int, overrides: list[str], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        print(f"matplotlib not installed: skipping {path.name}")
        return False
    cfg = load_config(PretrainConfig, config, [*overrides, f"--run.seed={seed}"])
    data = load_data(cfg.data, torch.device("cpu"), progress=False)
    clients = make_clients(cfg, data)
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
