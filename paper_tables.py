"""The paper's comparison tables on the default data, over several seeds, from one command.

    python paper_tables.py                                   # configs/tables_cpu.yaml, seeds 0 1 2 -> results/tables/
    python paper_tables.py --ablations                       # also Table 5: each of our additions toggled alone
    python paper_tables.py --config configs/default.yaml --seeds 0 1 2 --out results/default_tables

For each seed it pretrains FSSUAVL (one model, both modalities), the two separate models, and (unless --no-bounds)
the centralised bound and the IID federation (configs/centralised.yaml, configs/iid.yaml), evaluates each with
downstream.evaluate_checkpoint (what finetune.py runs), and evaluates the random-init network. "Two separate models" means: the image-only and the
audio-only model train on exactly FSSUAVL's federation (fed.federation=joint): the same partition, and in
each round the same sampled client ids; a client's image data trains the image model and its audio data the
audio model, and a sampled client without that modality sits the round out. The only difference from FSSUAVL
is one model versus two. It then writes, under --out:
- tables.md: every table, the claims table and the findings (each difference tested with Welch's t-test over seeds;
  the bounds split the gap to the raw input into recipe, federation and heterogeneity);
- table1_image.csv ... table5_ablations.csv;
- monitor_curves.png (probe, kNN and diagnostics by round against the raw input), partition.png (with matplotlib).
Table 4 is summed from the log.jsonl of the very runs behind Tables 1-3 (bytes that moved, steps, samples and
forward FLOPs that ran). Finished runs and evaluations are reused, so an interrupted command picks up where it
stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path

import yaml

import runtime
from checkpoints import load_checkpoint, load_latest_checkpoint
from downstream import RESULTS_FORMAT, evaluate_checkpoint
from engine import PretrainConfig
from models import ModelConfig, build_model, count_params
from plots import plot_monitor_curves, plot_partition, read_log
from pretraining import config_changes, pretrain
from settings import ConfigError, build_dataclass, int_at_least, load_config, split_overrides
from significance import finding, mean_std, multiple_comparisons, spearman, welch
from verdicts import BOUNDS, LABELS, accs, claims_table, decomposition

VARIANTS = {"fssuavl": ["image", "audio"], "image_only": ["image"], "audio_only": ["audio"]}
CONFIGS = Path(__file__).parent / "configs"
EVAL_ARGS = ["--eval.protocols=[linear, knn]", "--eval.label_fractions=[0.01, 0.1, 1.0]"]


def variant_overrides(path: str | Path) -> list[str]:
    """The dotted overrides a variant config makes to its `base:` (its own lines, less base and run), so a table's
    variant and the config file a user runs can never drift apart."""
    raw = yaml.safe_load(Path(path).read_text()) or {}

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"--{prefix}{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}"
    return list(flat({k: v for k, v in raw.items() if k not in ("base", "run")}))


# the paper's plain recipe: global average pooling, plain FedAvg weighting, ordinary shared BN with EMA statistics
PAPER_PLAIN = variant_overrides(Path(__file__).parent / "configs" / "paper_plain.yaml")
# Table 5: each of our additions toggled alone against the default (name, label, overrides)
ABLATIONS = [
    ("paper_plain", "paper's plain recipe (all four additions off)", PAPER_PLAIN),
    ("pool_avg", "global average pooling (not the time read-out)", ["--model.pool=avg"]),
    ("bn_shared", "shared BN running statistics (not per modality)", ["--model.bn_stats=shared"]),
    ("weighting_total", "plain FedAvg weighting (not per modality)", ["--fed.weighting=total"]),
    ("bn_ema", "EMA BN statistics, momentum 0.1 (not cumulative)", ["--model.bn_momentum=0.1"]),
    ("order_sum", "one step on L_img + L_aud (not alternate)", ["--fed.order=sum"]),
    ("cross_modal", "cross-modal negatives (order=sum, same loss scale)",
     ["--fed.order=sum", "--fed.cross_modal_negatives=true"]),
    ("shared_stem", "one shared stem (audio repeated to image channels)", ["--model.input_sharing=shared"]),
    ("head_per_modality", "a projection head per modality", ["--model.head=per_modality"]),
    ("vicreg", "VICReg objective instead of NT-Xent, gradients clipped at norm 1 (unclipped it diverged in round 3)",
     ["--loss.name=vicreg", "--optim.grad_clip=1.0"]),
]
ABLATION_EVAL = ["--eval.protocols=[linear]", "--eval.label_fractions=[1.0]", "--eval.tasks=[image, audio]"]
# --strategies: FSSUAVL under each server strategy against FedAvg (the default runs), same clients and budget
STRATEGY_RUNS = [
    ("fedprox", "FedProx (mu = 0.01)", ["--fed.aggregation=fedprox", "--fed.strategy.prox_mu=0.01"]),
    ("fedavgm", "FedAvgM (server momentum 0.9, server lr 1)", ["--fed.aggregation=fedavgm", "--fed.strategy.server_momentum=0.9"]),
    ("ldawa", "L-DAWA", ["--fed.aggregation=ldawa"]),
    ("median", "coordinate-wise median", ["--fed.aggregation=median"]),
]


# ----------------------------------------------------------------------------- running the grid

def ensure_pretrained(config: str, run_dir: Path, seed: int, modalities: list[str], extra: list[str]) -> Path:
    """Pretrain into run_dir, or continue it: --resume starts fresh where nothing was saved yet and carries on
    from the last completed round otherwise. A finished run is reused only when it was trained with exactly the
    resolved config asked for now (else a ConfigError names the keys); a damaged last.pt falls back to .prev."""
    ckpt = run_dir / "last.pt"
    args = [config, f"--run.out_dir={run_dir}", f"--run.seed={seed}", f"--data.modalities={modalities}", *extra]
    cfg = load_config(PretrainConfig, config, args[1:])
    found = load_latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if found is not None:
        changed = config_changes(found[0], cfg)
        if changed:
            raise ConfigError(f"{run_dir} holds a run trained with another config ({'; '.join(changed)}): give another "
                              f"--out, or delete {run_dir} to train it again with these settings")
        if found[0]["round"] >= cfg.fed.rounds and found[1] == ckpt:
            return ckpt
    pretrain(config, args[1:], resume=True)
    return ckpt


NO_RAW = "--eval.raw_input=false"


def ensure_evaluated(ckpt: Path, out_dir: Path, seed: int, random_init: bool, extra: list[str], raw: bool = True) -> dict:
    """The evaluation of `ckpt` with these settings: results.json is reused only when it was made from this very
    checkpoint (its sha256 and round) with the same evaluation overrides, by this version of the evaluation
    (downstream.RESULTS_FORMAT); otherwise it is computed again. raw=False leaves out the raw-input rows (they do
    not depend on the checkpoint: the tables take them from FSSUAVL's evaluation of the seed); an evaluation that
    has them serves a request without them."""
    path = out_dir / ("results_random_init.json" if random_init else "results.json")
    overrides = [f"--run.out_dir={out_dir}", f"--run.seed={seed}", *EVAL_ARGS, *extra, *([] if raw else [NO_RAW])]
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
            print(f"{path} is unreadable (truncated?): evaluating again")
        ck = load_checkpoint(ckpt)
        if (old.get("format"), old.get("ckpt_sha256"), old.get("round")) == (RESULTS_FORMAT, ck.get("sha256"), ck["round"]) \
                and old.get("overrides") in (overrides, [o for o in overrides if o != NO_RAW]):
            return old
    return evaluate_checkpoint(ckpt, None, overrides, random_init)


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
            row = {"model": LABELS[v], "dim": feature_dim(per_seed, task, features),
                   "protocol": proto, "seeds": " ".join(str(r["seed"]) for r in per_seed),
                   "config": per_seed[0].get("config_name", "")}
            for frac in (0.01, 0.1, 1.0):
                vals = accs(per_seed, task, features, proto, frac)
                if len(vals) == len(per_seed):
                    row[f"{frac:.0%} labels"] = mean_std(vals)
            if len(row) > 5:
                rows.append(row)
    return rows


def feature_dim(per_seed: list[dict], task: str, features: str):
    """The width of the features behind a row (results.json rows carry it), or None where not recorded."""
    return next((x.get("dim") for r in per_seed[:1] for x in r["rows"] if x["task"] == task and x["features"] == features),
                None)


PAIRED_FEATURES = {"image": "image alone", "audio": "audio alone (clip of the image's class)",
                   "fused": "fused: image + clip of its class", "fused_random_audio": "control: image + clip of a random class"}


def paired_table(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for v in ("fssuavl", *BOUNDS, "raw_input"):
        per_seed = results.get(v, [])
        for feats, label in PAIRED_FEATURES.items():
            for proto in ("linear", "knn"):
                row = {"model": LABELS[v], "features": label, "dim": feature_dim(per_seed, "paired", feats), "protocol": proto,
                       "seeds": " ".join(str(r["seed"]) for r in per_seed)}
                for frac in (0.01, 0.1, 1.0):
                    vals = accs(per_seed, "paired", feats, proto, frac)
                    if vals and len(vals) == len(per_seed):
                        row[f"{frac:.0%} labels"] = mean_std(vals)
                if len(row) > 5:
                    rows.append(row)
    return rows


# ----------------------------------------------------------------------------- measured costs

def run_costs(run_dir: Path) -> dict:
    """Totals over a run's log.jsonl: bytes uploaded and downloaded, local steps, samples, forward FLOPs."""
    log = read_log(run_dir)
    rounds = [r for r in log if r.get("round", 0) >= 1 and "bytes_up" in r]
    keys = ("bytes_up", "bytes_down", "steps", "fwd_flops", "samples_image", "samples_audio")
    out = {k: sum(r.get(k, 0) for r in rounds) for k in keys}
    out["rounds"] = len(rounds)
    out["uploads"] = sum(len(r.get("per_client", [])) for r in rounds)
    return out


def efficiency_table(run_dirs: dict[str, list[Path]]) -> tuple[list[dict], dict]:
    """Table 4 from the logs of the runs behind Tables 1-3: parameters, forward GFLOPs per image and per clip
    (torch's flop counter on the model), and what the runs measured over all rounds (MB uploaded and
    downloaded, uploads, local steps, forward TFLOPs), mean over seeds; then FSSUAVL / (image + audio model)."""
    per = {}
    for v, dirs in run_dirs.items():
        if not dirs:
            continue
        costs = [run_costs(d) for d in dirs]
        ck = load_checkpoint(dirs[0] / "last.pt")
        shapes = {m: tuple(sh) for m, sh in ck["input_shapes"].items()}
        mcfg = build_dataclass(ModelConfig, ck["config"]["model"], "model.")
        per[v] = {"parameters": count_params(build_model(mcfg, shapes)),
                  "GFLOPs/image": ck.get("forward_flops", {}).get("image", 0) / 1e9,
                  "GFLOPs/clip": ck.get("forward_flops", {}).get("audio", 0) / 1e9,
                  **{k: statistics.mean(c[k] for c in costs) for k in costs[0]}}

    def row(label, d):
        return {"setup": label, "parameters": int(d["parameters"]), "GFLOPs/image": d["GFLOPs/image"] or None,
                "GFLOPs/clip": d["GFLOPs/clip"] or None, "uploads": d["uploads"],
                "MB up (run)": d["bytes_up"] / 1e6, "MB down (run)": d["bytes_down"] / 1e6,
                "MB up per round": d["bytes_up"] / 1e6 / max(1, d["rounds"]), "local steps": d["steps"],
                "forward TFLOPs (run)": d["fwd_flops"] / 1e12}
    rows = [row(LABELS[v], per[v]) for v in VARIANTS if v in per]
    if {"fssuavl", "image_only", "audio_only"} <= set(per):
        two = {k: per["image_only"][k] + per["audio_only"][k] for k in per["fssuavl"]}
        two["rounds"] = per["fssuavl"]["rounds"]
        two["GFLOPs/image"], two["GFLOPs/clip"] = per["image_only"]["GFLOPs/image"], per["audio_only"]["GFLOPs/clip"]
        rows.append(row("two models: image-only + audio-only", two))
        f = rows[0]
        rows.append({"setup": "ratio FSSUAVL / two models",
                     **{k: (f[k] / rows[-1][k] if isinstance(f[k], (int, float)) and rows[-1][k] else None)
                        for k in f if k != "setup"}})
    return rows, per


PARTICIPATION = ("Participation, as measured: each round samples the same K client ids for all three federations; "
                 "a sampled client trains and uploads every model whose modality it holds (a client holding both "
                 "modalities uploads one model in FSSUAVL and two in the two-model setup) and sits out a model whose "
                 "modality it lacks. Uploads count the tensors the server aggregates; downloads the shared global "
                 "tensors sent to each participating client. Forward FLOPs = samples forwarded (two views each) x the "
                 "counted FLOPs per sample; a training step costs about three times its forward pass.")


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


# ----------------------------------------------------------------------------- ablations and findings

def ablation_table(default: list[dict], ablations: dict[str, list[dict]], spec=None,
                   default_label: str = "default (all our additions on)") -> list[dict]:
    """Table 5 (and the strategies table): image and audio linear probe (100% labels) of the default and of
    each variant in `spec` (name, label, overrides), with the Welch p-value of each against the default."""
    rows = []
    base = {m: accs(default, m, m, "linear", 1.0) for m in ("image", "audio")}
    rows.append({"variant": default_label, "overrides": "",
                 "seeds": " ".join(str(r["seed"]) for r in default),
                 **{f"{m} linear 100%": mean_std(base[m]) for m in base if base[m]}})
    for name, label, overrides in (ABLATIONS if spec is None else spec):
        per_seed = ablations.get(name, [])
        if not per_seed:
            continue
        row = {"variant": label, "overrides": " ".join(overrides), "seeds": " ".join(str(r["seed"]) for r in per_seed)}
        for m in ("image", "audio"):
            vals = accs(per_seed, m, m, "linear", 1.0)
            if vals:
                row[f"{m} linear 100%"] = mean_std(vals)
                if len(vals) > 1 and len(base[m]) > 1:
                    row[f"{m} p vs default"] = round(welch(vals, base[m])[2], 4)
        rows.append(row)
    return rows


def monitor_agreement(run_dirs: dict[str, list[Path]]) -> list[str]:
    """Does the logged monitor (kNN on standardised features) move with the linear probe? Spearman's rho between
    the two over every evaluation round of every run that trained the modality, pooled over seeds and variants,
    and the mean of the per-run rhos."""
    lines = []
    for m in ("image", "audio"):
        pooled, per_run = ([], []), []
        for v, dirs in run_dirs.items():
            for d in dirs:
                pts = [(r[f"knn_{m}"], r[f"probe_{m}"]) for r in read_log(d) if f"knn_{m}" in r and f"probe_{m}" in r]
                if len(pts) < 3 or m not in VARIANTS.get(v, VARIANTS["fssuavl"]):
                    continue
                pooled[0].extend(p[0] for p in pts)
                pooled[1].extend(p[1] for p in pts)
                rho = spearman(*zip(*pts))
                if rho == rho:
                    per_run.append(rho)
        if len(pooled[0]) >= 3:
            lines.append(f"Monitor vs probe, {m}: Spearman rho = {spearman(*pooled):.2f} between the kNN monitor and the "
                         f"linear probe over {len(pooled[0])} evaluations ({len(per_run)} runs, every evaluation round); "
                         f"mean within-run rho {statistics.mean(per_run):.2f}" if per_run else "")
    return [ln for ln in lines if ln]


def findings(results: dict[str, list[dict]], ablations: dict[str, list[dict]], costs: dict,
             strategies: dict[str, list[dict]] | None = None) -> list[str]:
    """The "what these numbers say" lines, computed: linear probe at 100% labels unless stated."""
    lines = []
    for m, own in (("image", "image_only"), ("audio", "audio_only")):
        what = f"{m.capitalize()} task, linear probe, 100% labels"
        f, o, r, x = (accs(results.get(v, []), m, m, "linear", 1.0) for v in ("fssuavl", own, "random_init", "raw_input"))
        lines.append(finding(what, "FSSUAVL", f, LABELS[own], o))
        lines.append(finding(what, "FSSUAVL", f, "the raw input", x))
        lines.append(finding(what, LABELS[own], o, "the raw input", x))
        lines.append(finding(what, "FSSUAVL", f, "random init", r))
        lines.append(finding(what, LABELS[own], o, "random init", r))
    lines += decomposition(results)
    fs = results.get("fssuavl", [])
    fused, img, aud, ctrl = (accs(fs, "paired", k, "linear", 1.0) for k in ("fused", "image", "audio", "fused_random_audio"))
    lines.append(finding("Paired task, linear probe, 100% labels", "fused", fused, "image alone", img))
    lines.append(finding("Paired task, linear probe, 100% labels", "fused", fused, "audio alone", aud))
    raw_fused = accs(results.get("raw_input", []), "paired", "fused", "linear", 1.0)
    lines.append(finding("Paired task, linear probe, 100% labels", "fused FSSUAVL features", fused,
                         "fused raw input", raw_fused))
    lines.append(finding("Paired task control (audio of a random class), linear probe, 100% labels",
                         "fused with random-class audio", ctrl, "image alone", img))
    if {"fssuavl", "image_only", "audio_only"} <= set(costs):
        c = {k: costs["fssuavl"][k] / (costs["image_only"][k] + costs["audio_only"][k]) for k in ("bytes_up", "bytes_down")}
        p = costs["fssuavl"]["parameters"] / (costs["image_only"]["parameters"] + costs["audio_only"]["parameters"])
        lines.append(f"Efficiency (measured over the runs): FSSUAVL uploads {c['bytes_up']:.3f}x and downloads "
                     f"{c['bytes_down']:.3f}x the bytes of the two separate models, with {p:.3f}x their parameters.")
    default = results.get("fssuavl", [])
    for kind, runs, spec, other in (("Ablation", ablations, ABLATIONS, "the default"),
                                    ("Strategy", strategies or {}, STRATEGY_RUNS, "FedAvg")):
        block = []
        for name, label, _ in spec:
            for m in ("image", "audio"):
                if runs.get(name):
                    block.append(finding(f"{kind}, {m} linear probe", label, accs(runs[name], m, m, "linear", 1.0),
                                         other, accs(default, m, m, "linear", 1.0)))
        lines += block
        tested = [ln for ln in block if "Welch p = " in ln]
        if len(tested) > 1:
            lines.append(multiple_comparisons({"Ablation": "Ablations", "Strategy": "Strategies"}[kind], len(tested),
                                              sum("**" in ln for ln in tested)))
    return lines


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tables_cpu.yaml", help="pretraining config for every run")
    p.add_argument("--seeds", type=int_at_least(0, 2 ** 63 - 1), nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="results/tables")
    p.add_argument("--no-bounds", dest="bounds", action="store_false",
                   help="leave out the centralised and IID rows (configs/centralised.yaml, configs/iid.yaml)")
    p.add_argument("--ablations", action="store_true", help="also Table 5: FSSUAVL with each of our additions toggled")
    p.add_argument("--strategies", action="store_true", help="also Table 6: FSSUAVL under each server strategy vs FedAvg")
    p.add_argument("--eval", nargs="*", default=[], metavar="--eval.key=value",
                   help="extra finetune.py overrides, e.g. --eval --eval.probe_iters=50")
    full = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = split_overrides(full)
    args = p.parse_args(argv)
    args.command = "python paper_tables.py " + shlex.join(full)
    if len(args.seeds) != len(set(args.seeds)):
        p.error(f"--seeds {args.seeds}: each seed once")
    args.eval_extra = [o for o in overrides if o.startswith(("--eval.", "--data."))] + args.eval
    args.pre_extra = [o for o in overrides if not o.startswith("--eval.")]
    return args


def bound_overrides(name: str, fssuavl_dir: Path) -> list[str]:
    """A bound's overrides to the tables' config: its config file's own lines; the centralised bound matches the
    budget of the FSSUAVL run of its seed (that run's resolved config.yaml), whatever config the tables use."""
    over = variant_overrides(CONFIGS / f"{name}.yaml")
    if name == "centralised":
        over = [o for o in over if not o.startswith("--fed.budget_of=")] + [f"--fed.budget_of={fssuavl_dir / 'config.yaml'}"]
    return over


def run_grid(args, out: Path) -> tuple[dict, dict, dict]:
    """Every run and evaluation behind the tables (reused where finished): the three variants and random init per
    seed, then the ablation and strategy runs asked for. Returns (results, run_dirs, {kind: {name: results}})."""
    config_name = Path(args.config).name
    results: dict[str, list[dict]] = {v: [] for v in [*VARIANTS, *BOUNDS, "random_init", "raw_input"]}
    run_dirs: dict[str, list[Path]] = {v: [] for v in [*VARIANTS, *BOUNDS]}
    for seed in args.seeds:
        runs = [(v, mods, []) for v, mods in VARIANTS.items()]
        if args.bounds:
            fs_dir = out / "runs" / f"fssuavl_seed{seed}"
            runs += [(b, VARIANTS["fssuavl"], bound_overrides(b, fs_dir)) for b in BOUNDS]
        for v, mods, over in runs:
            rd = out / "runs" / f"{v}_seed{seed}"
            ckpt = ensure_pretrained(args.config, rd, seed, mods, [*args.pre_extra, *over])
            res = ensure_evaluated(ckpt, rd, seed, False, args.eval_extra, raw=v == "fssuavl")
            results[v].append({**res, "config_name": f"{v}.yaml" if over else config_name})
            run_dirs[v].append(rd)
        rd = out / "runs" / f"random_init_seed{seed}"
        res = ensure_evaluated(out / "runs" / f"fssuavl_seed{seed}" / "last.pt", rd, seed, True, args.eval_extra,
                               raw=False)
        results["random_init"].append({**res, "config_name": config_name})
        # the bar: the input itself through the same probe and kNN, evaluated beside FSSUAVL (same data, splits, seed)
        fs = results["fssuavl"][-1]
        results["raw_input"].append({**fs, "rows": fs["raw_input_rows"]})
    extra_runs: dict[str, dict[str, list[dict]]] = {"ablation": {}, "strategy": {}}
    for kind, wanted, spec in (("ablation", args.ablations, ABLATIONS), ("strategy", args.strategies, STRATEGY_RUNS)):
        for seed in args.seeds if wanted else []:
            for name, _, over in spec:
                rd = out / "runs" / f"{kind}_{name}_seed{seed}"
                ckpt = ensure_pretrained(args.config, rd, seed, VARIANTS["fssuavl"], [*args.pre_extra, *over])
                res = ensure_evaluated(ckpt, rd, seed, False, [*args.eval_extra, *ABLATION_EVAL])
                extra_runs[kind].setdefault(name, []).append(res)
    return results, run_dirs, extra_runs


def build_tables(args, results, run_dirs, extra_runs) -> tuple[dict, dict]:
    """{csv name: (title, rows)} for Tables 1-4 (and 5, 6 when asked), and the measured costs behind Table 4."""
    n = len(args.seeds)
    eff_rows, costs = efficiency_table({v: run_dirs[v] for v in VARIANTS})
    tables = {
        "table1_image": (f"Table 1: image task (Fashion-MNIST test), accuracy %, mean ± std over {n} seeds",
                         accuracy_table(results, "image", "image", ["fssuavl", "image_only", *BOUNDS, "raw_input",
                                                                   "random_init"])),
        "table2_audio": (f"Table 2: audio task (20 spoken words, held-out voices), accuracy %, mean ± std over {n} seeds",
                         accuracy_table(results, "audio", "audio", ["fssuavl", "audio_only", *BOUNDS, "raw_input",
                                                                   "random_init"])),
        "table3_paired": (f"Table 3: paired task, one FSSUAVL model and the raw input, accuracy %, mean ± std over {n} seeds. Each test "
                          f"image is paired with a held-out voice speaking its class name (the audio carries the label "
                          f"by construction, as in AV-MNIST); the control pairs it with a clip of a random class",
                          paired_table(results)),
        "table4_efficiency": (f"Table 4: efficiency, FSSUAVL vs two separate models, measured from the logs of the runs "
                              f"behind Tables 1-3 (mean over {n} seeds). {PARTICIPATION}", eff_rows),
    }
    if args.ablations:
        tables["table5_ablations"] = (f"Table 5: ablations, FSSUAVL with each of our additions toggled alone, linear "
                                      f"probe %, mean ± std over {n} seeds; p = Welch's t-test against the default "
                                      f"(cross-modal negatives need order=sum: compare that row with the order=sum row)",
                                      ablation_table(results["fssuavl"], extra_runs["ablation"]))
    if args.strategies:
        tables["table6_strategies"] = (f"Table 6: server strategies, FSSUAVL on the same clients and budget, linear probe %, "
                                       f"mean ± std over {n} seeds; p = Welch's t-test against FedAvg",
                                       ablation_table(results["fssuavl"], extra_runs["strategy"], STRATEGY_RUNS,
                                                      "FedAvg (the default)"))
    return tables, costs


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = runtime.Timer()
    results, run_dirs, extra_runs = run_grid(args, out)
    tables, costs = build_tables(args, results, run_dirs, extra_runs)
    tables["claims"] = (f"The claims, linear probe, mean ± std over {len(args.seeds)} seeds; a yes needs Welch's p < 0.05",
                        claims_table(results))
    lines = findings(results, extra_runs["ablation"], costs, extra_runs["strategy"]) + monitor_agreement(run_dirs)
    md = [f"# FSSUAVL comparison tables\n\nConfig `{args.config}`, seeds {args.seeds}, "
          f"probe: {', '.join(EVAL_ARGS)}. Generated by `{args.command}`.\n"]
    for name, (title, rows) in tables.items():
        for r in rows:
            r.setdefault("config", Path(args.config).name)
        to_csv(rows, out / f"{name}.csv")
        md.append(to_markdown(rows, title))
    md.append("### What these numbers say (computed; a win needs Welch's t-test p < 0.05 over seeds)\n\n"
              + "\n".join(f"- {ln}" for ln in lines) + "\n")
    plot_monitor_curves(run_dirs, LABELS, out / "monitor_curves.png")
    plot_partition(args.config, args.seeds[0], args.pre_extra, out / "partition.png")
    minutes = t() / 60
    md.append(f"Wall time of this command: {minutes:.1f} min (reused runs and evaluations are not re-timed).\n")
    text = "\n".join(md)
    (out / "tables.md").write_text(text)
    print(text)
    print(f"tables in {out}/ ({minutes:.1f} min)")
    return {"tables": tables, "results": results, "findings": lines, "ablations": extra_runs["ablation"],
            "strategies": extra_runs["strategy"]}


if __name__ == "__main__":
    main()
