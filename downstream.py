"""Downstream evaluation of a pretrained backbone, as a library: the eval config, the tasks (image, audio, paired
audio+image with its uninformative-pairs control, out-of-domain FluidR3 audio) x protocols (linear probe, kNN,
fine-tuning) x label fractions, and `evaluate_checkpoint`, which finetune.py and the tables script call. The
primitives themselves are in evaluation.py.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch

import runtime
from catalog import check_dataset_name, has_real_pairs, load_data, load_named
from checkpoints import RunDirError, load_checkpoint
from data import DataConfig, DataError, ModalityData
from evaluation import (RawInput, extract_features, finetune_model, fuse, knn_predict, label_subset, linear_probe,
                        load_backbone, make_pairs, standardize, suited_k)
from modality_specs import MODALITIES
from models import POOLS, backbone_family
from readers import FLUIDR3_SF2
from settings import ConfigError, RunConfig, apply_overrides, build_dataclass, check_choice, check_range, \
    expand_path, read_yaml, to_dict

RESULTS_FORMAT = 2  # results.json as written now: 2 = kNN on standardised features, raw-input rows
TASKS = MODALITIES + ("paired", "fluidr3")  # one task per modality, then the paired and out-of-domain ones
PROTOCOLS = ("linear", "knn", "finetune")


@dataclass
class EvalConfig:
    tasks: tuple[str, ...] = TASKS                 # those the model's modalities allow are run; fluidr3 = out-of-domain audio
    fluidr3_sf2: Optional[str] = None              # soundfont for the fluidr3 task (None: the Debian FluidR3_GM.sf2)
    protocols: tuple[str, ...] = ("linear", "knn")
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # labelled fraction of the downstream training set
    max_train_images: int = 0        # downstream image training set size (0 = all, whatever pretraining used)
    max_test_images: int = 0         # downstream image test set size (0 = all, whatever pretraining used): quick checks
    knn_k: int = 0                   # 0 = suited to the bank (half the smallest class's labelled count, 5..200)
    knn_t: float = 0.1               # kNN vote temperature
    val_frac: float = 0.1            # held out of the labelled set to choose the probe's weight decay
    wd_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    probe_iters: int = 100           # L-BFGS iterations of the linear probe
    finetune_epochs: int = 5
    finetune_lr: float = 0.01        # SGD, backbone and head
    batch_size: int = 256
    raw_input: bool = True           # also the input itself (standardised) through the same probe and kNN: the bar
    pool: Union[str, dict[str, str], None] = None  # read the trained map out another way (models.POOLS; one, or per
                                     # modality); None: the read-out the backbone was pretrained with (model.pool)

    def __post_init__(self):
        for key in ("tasks", "protocols", "label_fractions", "wd_grid"):
            if not getattr(self, key):
                raise ConfigError(f"eval.{key}=[]: give at least one (an empty list would write a results file with no rows)")
        self.fluidr3_sf2 = expand_path(self.fluidr3_sf2, "eval.fluidr3_sf2")
        check_range("eval.probe_iters", self.probe_iters, lo=1, hi=100_000)
        check_range("eval.finetune_epochs", self.finetune_epochs, lo=1, hi=10_000)
        check_range("eval.finetune_lr", self.finetune_lr, lo=0.0, lo_open=True, hi=100.0)
        check_range("eval.batch_size", self.batch_size, lo=2, hi=1 << 20)
        check_range("eval.knn_t", self.knn_t, lo=0.0, lo_open=True, hi=100.0)
        check_range("eval.max_train_images", self.max_train_images, lo=0)
        check_range("eval.max_test_images", self.max_test_images, lo=0)
        for wd in self.wd_grid:
            check_range("eval.wd_grid", wd, lo=0.0, hi=10.0)
        for t in self.tasks:
            check_choice("eval.tasks", t, TASKS)
        for p in self.protocols:
            check_choice("eval.protocols", p, PROTOCOLS)
        for f in self.label_fractions:
            check_range("eval.label_fractions", f, lo=0.0, hi=1.0, lo_open=True)
        check_range("eval.val_frac", self.val_frac, lo=0.0, hi=0.5, lo_open=True)
        check_range("eval.knn_k", self.knn_k, lo=0)
        for m, kind in (self.pool.items() if isinstance(self.pool, dict) else [(None, self.pool)]):
            if kind is not None:
                check_choice("eval.pool" + (f".{m}" if m else ""), kind, tuple(POOLS))


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir=""))  # "" = beside the checkpoint

    def __post_init__(self):
        check_dataset_name(self.data.dataset)


# ----------------------------------------------------------------------------- the evaluation

def fluidr3_data(cfg: FinetuneConfig, device, log=print) -> Optional[ModalityData]:
    """The out-of-domain audio task: GM instrument notes rendered from the FluidR3 soundfont (16
    families, unseen instruments in the test split), through the pretraining's audio front-end."""
    sf2 = cfg.eval.fluidr3_sf2 or FLUIDR3_SF2
    if not Path(sf2).is_file() or not shutil.which("fluidsynth"):
        log(f"skipping the fluidr3 task: needs fluidsynth and {sf2} (sudo apt-get install fluidsynth fluid-soundfont-gm)")
        return None
    dc = replace(cfg.data, dataset="cifar10+fluidr3", modalities=("audio",), audio_root=sf2, clip_seconds=1.0,
                 max_train_images=0)
    return load_named(dc, device)["audio"]


def evaluate_tasks(model, data: dict[str, ModalityData], cfg: FinetuneConfig, device, log=print) -> list[dict]:
    """Every configured task x protocol x label fraction the model's modalities allow. Each row:
    task, features (image | audio | fused), protocol, label_frac, acc (%), n_train, n_test."""
    ec, seed = cfg.eval, cfg.run.seed
    feats = {}
    for m, md in data.items():
        tr, ytr = extract_features(model, md, "train", m, normalize=False, amp=cfg.run.amp)
        te, yte = extract_features(model, md, "test", m, normalize=False, amp=cfg.run.amp)
        feats[m] = (tr, ytr, te, yte)
    sets = {m: (m, *feats[m]) for m in data if m in ec.tasks}
    if "fluidr3" in ec.tasks and "audio" in data:
        ood = fluidr3_data(cfg, device, log)
        if ood is not None:
            data = {**data, "fluidr3": ood}
            sets["fluidr3"] = ("fluidr3", *extract_features(model, ood, "train", "audio", normalize=False, amp=cfg.run.amp),
                               *extract_features(model, ood, "test", "audio", normalize=False, amp=cfg.run.amp))

    # paired task: class-name clips (labels 0..9 of the audio vocabulary) paired with images by class
    if "paired" in ec.tasks and {"image", "audio"} <= set(data):
        itr, iytr, ite, iyte = feats["image"]
        atr, aytr, ate, ayte = feats["audio"]
        if has_real_pairs(cfg.data.dataset):  # real pairs: image i and clip i come from one video
            ptr, pte = torch.arange(len(iytr), device=iytr.device), torch.arange(len(iyte), device=iyte.device)
        else:  # AV-Fashion: each image with a clip of its spoken class name
            ptr, pte = make_pairs(iytr, aytr, seed), make_pairs(iyte, ayte, seed + 1)
        if (ptr < 0).any() or (pte < 0).any():
            raise DataError("paired task: some image classes have no spoken clip of their class name")
        sets["paired/image"] = ("paired", itr, iytr, ite, iyte)
        sets["paired/audio"] = ("paired", atr[ptr], iytr, ate[pte], iyte)
        sets["paired/fused"] = ("paired", fuse(itr, atr[ptr]), iytr, fuse(ite, ate[pte]), iyte)
        if not has_real_pairs(cfg.data.dataset):
            # control: each image with a clip of a random class; fused should fall back to about the image alone
            rtr, rte = make_pairs(iytr, aytr, seed, informative=False), make_pairs(iyte, ayte, seed + 1, informative=False)
            sets["paired/fused_random_audio"] = ("paired", fuse(itr, atr[rtr]), iytr, fuse(ite, ate[rte]), iyte)

    rows = []
    for name, (task, tr, ytr, te, yte) in sets.items():
        feat_kind = name.split("/")[-1]
        if name == "paired/image" and "image" in sets:  # the same features and labels as the image task
            rows += [{**r, "task": "paired"} for r in rows if r["task"] == "image" and r["protocol"] != "finetune"]
            continue
        n_cls = int(max(ytr.max(), yte.max())) + 1
        for frac in ec.label_fractions:
            sub = label_subset(ytr, frac, seed)
            for proto in ec.protocols:
                if proto == "linear":
                    acc = linear_probe(tr[sub], ytr[sub], te, yte, n_cls, seed=seed, val_frac=ec.val_frac,
                                       wd_grid=ec.wd_grid, iters=ec.probe_iters)["acc"]
                elif proto == "knn":
                    bank, queries = standardize(tr[sub], te)
                    pred = knn_predict(bank, ytr[sub], queries, n_cls, k=suited_k(ytr[sub], ec.knn_k), t=ec.knn_t)
                    acc = 100.0 * (pred == yte).float().mean().item()
                else:
                    if task == "paired" or isinstance(model, RawInput):
                        continue  # fine-tuning is defined for the single-modality tasks, and for a network
                    md_m = "audio" if feat_kind == "fluidr3" else feat_kind
                    acc = finetune_model(model, data[feat_kind], md_m, sub, data_cfg=cfg.data, cfg=ec, seed=seed,
                                         amp=cfg.run.amp)
                rows.append({"task": task, "features": "audio" if feat_kind == "fluidr3" else feat_kind,
                             "protocol": proto, "label_frac": frac, "acc": round(acc, 3), "dim": tr.shape[1],
                             "n_train": len(sub), "n_test": len(yte)})
                log(f"{task:7s} {feat_kind:6s} {proto:8s} {frac:>5.0%} labels: {acc:6.2f}%")
    return rows


def markdown_table(rows: list[dict], title: str = "", raw_rows: list[dict] = ()) -> str:
    """task | features | protocol | one column per label fraction; each row of the raw input follows the model's
    row it is the bar for, as "features (raw input)"."""
    raw_rows = [{**r, "features": f"{r['features']} (raw input)", "raw_of": r["features"]} for r in raw_rows]
    fracs = sorted({r["label_frac"] for r in [*rows, *raw_rows]})
    keys = list(dict.fromkeys((r["task"], r["features"], r["protocol"]) for r in rows))
    raw_keys = list(dict.fromkeys((r["task"], r["features"], r["protocol"], r["raw_of"]) for r in raw_rows))
    ordered = []
    for k in keys:
        ordered += [k] + [rk[:3] for rk in raw_keys if (rk[0], rk[3], rk[2]) == k]
    ordered += [rk[:3] for rk in raw_keys if rk[:3] not in ordered]
    acc = {(r["task"], r["features"], r["protocol"], r["label_frac"]): r["acc"] for r in [*rows, *raw_rows]}
    dim = {(r["task"], r["features"], r["protocol"]): r.get("dim", "") for r in [*rows, *raw_rows]}
    out = [f"### {title}", ""] if title else []
    out.append("| task | features | dim | protocol | " + " | ".join(f"{f:.0%} labels" for f in fracs) + " |")
    out.append("|---|---|---|---|" + "---|" * len(fracs))
    for k in ordered:
        out.append(f"| {k[0]} | {k[1]} | {dim[k]} | {k[2]} | " + " | ".join(
            f"{acc[(*k, f)]:.2f}" if (*k, f) in acc else "-" for f in fracs) + " |")
    return "\n".join(out) + "\n"


def check_inputs(data: dict[str, ModalityData], ck: dict, cfg: FinetuneConfig) -> None:
    """The backbone only fits the inputs it was trained on: compare the data's input shapes with the
    checkpoint's and name the data options that differ."""
    trained = {m: tuple(s) for m, s in ck["input_shapes"].items()}
    bad = {m: (md.shape, trained[m]) for m, md in data.items() if m in trained and tuple(md.shape) != trained[m]}
    if bad:
        was = ck["config"].get("data", {})
        now = to_dict(cfg.data)
        keys = [f"data.{k}={now[k]!r} (checkpoint: {was[k]!r})" for k in sorted(now) if k in was and now[k] != was[k]
                and not isinstance(now[k], dict)]
        shapes = "; ".join(f"{m} inputs are {tuple(a)} but the checkpoint was trained on {tuple(b)}" for m, (a, b) in bad.items())
        raise ConfigError(f"{shapes}. " + (f"Options that differ: {', '.join(keys)}" if keys else
                                          "Use the data options the checkpoint was trained with"))


def set_readout(model, pool, arch: str) -> None:
    """eval.pool: read the backbone's features out with `pool` (one POOLS key, or {modality: key})."""
    pools = pool if isinstance(pool, dict) else {m: pool for m in model.pools}
    unknown = sorted(set(pools) - set(model.pools))
    if unknown:
        raise ConfigError(f"eval.pool={pool}: this backbone has no {', '.join(unknown)} input (it has "
                          f"{', '.join(model.pools)})")
    bad = sorted({k for k in pools.values() if k not in backbone_family(arch).pools})
    if bad:
        raise ConfigError(f"eval.pool={pool}: model.arch={arch} reads out {' or '.join(backbone_family(arch).pools)} only")
    model.set_pools(pools)


def evaluate_checkpoint(ckpt, config=None, overrides=(), random_init: bool = False) -> dict:
    """Every configured downstream task of the checkpoint `ckpt` (RUN_DIR/last.pt or RUN_DIR), with an optional
    YAML of eval/run/data sections and dotted overrides; random_init evaluates the same architecture untrained.
    Writes results[_random_init].json and .md (beside the checkpoint unless run.out_dir) and returns the result."""
    ckpt_path = Path(expand_path(str(ckpt), "--ckpt"))
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "last.pt"
    ck = load_checkpoint(ckpt_path)
    raw = {}
    if config:
        raw = read_yaml(config)
    data_raw = dict(ck["config"]["data"])
    data_raw.update(raw.pop("data", {}) or {})
    data_raw["modalities"] = list(ck["input_shapes"])  # the tasks the backbone has stems for
    raw["data"] = data_raw
    if raw.get("run") is None:
        raw["run"] = {}
    if isinstance(raw["run"], dict):  # no run.out_dir given: the results go beside the checkpoint
        raw["run"].setdefault("out_dir", "")
    apply_overrides(raw, overrides)
    cfg = build_dataclass(FinetuneConfig, raw)
    mods = set(ck["input_shapes"])
    if not [t for t in cfg.eval.tasks if t in mods or (t == "paired" and {"image", "audio"} <= mods)
            or (t == "fluidr3" and "audio" in mods)]:
        raise ConfigError(f"eval.tasks={list(cfg.eval.tasks)}: none applies to {ckpt_path}, pretrained on "
                          f"{', '.join(sorted(mods))}; give one of {', '.join(sorted(mods))} (or paired / fluidr3 where "
                          f"the modalities allow)")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = runtime.resolve_device(cfg.run.device)
    runtime.seed_everything(cfg.run.seed, cfg.run.deterministic, device)
    cfg.data.max_train_images, cfg.data.max_test_images = cfg.eval.max_train_images, cfg.eval.max_test_images
    model, _ = load_backbone(ckpt_path, random_init, cfg.run.seed, device)
    if cfg.eval.pool is not None:
        set_readout(model, cfg.eval.pool, ck["config"]["model"]["arch"])
    data = load_data(cfg.data, device, progress=cfg.run.progress and sys.stderr.isatty())
    check_inputs(data, ck, cfg)
    for m, st in ck.get("input_stats", {}).items():  # normalise exactly as in pretraining
        if m in data:
            data[m].mean = torch.tensor(st["mean"], device=device)
            data[m].std = torch.tensor(st["std"], device=device)

    if ck.get("runaway") and not random_init:
        print(f"warning: {ckpt_path} is marked as a runaway run (round {ck['runaway']['round']}: weights "
              f"{ck['runaway']['weight_norm_ratio']:.3g}x their initial norm): it is not a trained model")
    t = runtime.Timer()
    rows = evaluate_tasks(model, data, cfg, device)
    raw_rows = []
    if cfg.eval.raw_input and not random_init:  # the bar: the same tasks, splits and classifiers on the input itself
        raw = RawInput({m: md.shape for m, md in data.items()}, device)
        raw_rows = evaluate_tasks(raw, data, cfg, device, log=lambda line: print(f"raw input: {line}"))
    if not rows:
        raise DataError(f"no task of eval.tasks={list(cfg.eval.tasks)} could be evaluated (see the lines above): "
                        f"nothing was written")
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else ckpt_path.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot write results to {out_dir}: {e.strerror or e}") from e
    stem = "results_random_init" if random_init else "results"
    result = {"format": RESULTS_FORMAT, "ckpt": str(ckpt_path), "ckpt_sha256": ck.get("sha256"), "runaway": bool(ck.get("runaway")), "random_init": random_init, "round": ck["round"],
              "model": ck["config"]["model"], "pretrain_modalities": list(ck["input_shapes"]),
              "config": to_dict(cfg), "overrides": list(overrides), "seed": cfg.run.seed, "seconds": round(t(), 1), "rows": rows,
              "raw_input_rows": raw_rows,
              "env": runtime.environment_info(device)}
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    title = f"{ckpt_path} ({'random init' if random_init else 'round ' + str(ck['round'])}, seed {cfg.run.seed})"
    table = markdown_table(rows, title, raw_rows)
    (out_dir / f"{stem}.md").write_text(table)
    print(table)
    print(f"results in {out_dir}/{stem}.json and {stem}.md")
    return result

