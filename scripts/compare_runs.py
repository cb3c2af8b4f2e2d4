"""Compare the downstream results of one arm over seeds with the raw input it was computed from (and optionally
with a second arm), with Welch's t-test over the seeds: what docs/results.md's read-out comparison prints.

    python scripts/compare_runs.py results/levers/pool_time_seed{0,1,2}/results.json
    python scripts/compare_runs.py A_seed{0,1,2}/results.json --vs B_seed{0,1,2}/results.json --name-a time --name-b avg

Each results.json is finetune.py's (one per seed). For every single-modality task (image, audio), protocol and label
fraction present in all of them it prints the arm's mean +- std over the files, the feature width, the raw input's
(its rows in the same files, on the same label subsets), and Welch's p of arm vs raw input (and of A vs B).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from significance import mean_std, welch  # noqa: E402


def rows(path: str, key: str = "rows") -> dict:
    d = json.loads(Path(path).read_text())
    return {(r["task"], r["protocol"], r["label_frac"]): (r["acc"], r.get("dim"))
            for r in d.get(key, []) if r["task"] == r["features"] and r["task"] in ("image", "audio")}


def fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def table(a: list[str], b: list[str] | None, name_a: str, name_b: str) -> list[str]:
    ra, raw = [rows(f) for f in a], [rows(f, "raw_input_rows") for f in a]
    rb = [rows(f) for f in b] if b else None
    keys = sorted(set.intersection(*(set(r) for r in ra + raw + (rb or []))),
                  key=lambda k: (k[0] != "image", k[1] != "linear", k[2]))
    head = f"| task | protocol | labels | {name_a} (dim) | raw input (dim) | p {name_a} vs raw |"
    head += f" {name_b} (dim) | p {name_a} vs {name_b} |" if rb else ""
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for k in keys:
        xa, xr = [r[k][0] for r in ra], [r[k][0] for r in raw]
        line = (f"| {k[0]} | {k[1]} | {k[2]:.0%} | {mean_std(xa)} ({ra[0][k][1]}) | {mean_std(xr)} ({raw[0][k][1]}) | "
                f"{fmt_p(welch(xa, xr)[2])} |")
        if rb:
            xb = [r[k][0] for r in rb]
            line += f" {mean_std(xb)} ({rb[0][k][1]}) | {fmt_p(welch(xa, xb)[2])} |"
        out.append(line)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="finetune.py's results.json, one per seed")
    p.add_argument("--vs", nargs="+", help="a second arm's results.json, one per seed")
    p.add_argument("--name-a", default="features")
    p.add_argument("--name-b", default="other")
    a = p.parse_args(argv)
    if len(a.results) < 2 or (a.vs and len(a.vs) < 2):
        p.error("Welch's test needs at least two seeds per arm")
    print(f"{len(a.results)} seeds; mean +- std over them; Welch's two-sided p")
    print("\n".join(table(a.results, a.vs, a.name_a, a.name_b)))


if __name__ == "__main__":
    main()
