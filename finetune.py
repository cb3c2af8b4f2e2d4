"""Downstream evaluation of a pretrained FSSUAVL backbone: linear probe, kNN and (optionally) full
fine-tuning on image, audio and paired audio+image tasks, at several label fractions.

    python finetune.py --ckpt runs/default/last.pt                  # writes results.json + results.md beside it
    python finetune.py --ckpt runs/default/last.pt --random-init    # the same architecture untrained (the floor)
    python finetune.py --ckpt runs/default/last.pt --eval.protocols=[linear,knn,finetune] --eval.label_fractions=[1.0]

The backbone (stems + trunk) is taken from the checkpoint by explicit key prefix; the data section of the
checkpoint's config defines the tasks (overridable with --data.key=value).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime
from data import DataConfig, DataError, ModalityData, augment, stratified_subset
from models import ModelConfig, build_model
from readers import load_data
from runtime import CheckpointError, ConfigError, RunConfig, autocast

BACKBONE_PREFIXES = ("stems.", "trunk.")   # what downstream tasks take from a checkpoint
IGNORED_PREFIXES = ("heads.",)             # present in a checkpoint, not used downstream
TASKS = ("image", "audio", "paired", "fluidr3")
PROTOCOLS = ("linear", "knn", "finetune")


@dataclass
class EvalConfig:
    tasks: tuple[str, ...] = TASKS                 # those the model's modalities allow are run; fluidr3 = out-of-domain audio
    fluidr3_sf2: Optional[str] = None              # soundfont for the fluidr3 task (None: the Debian FluidR3_GM.sf2)
    protocols: tuple[str, ...] = ("linear", "knn")
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # labelled fraction of the downstream training set
    max_train_images: int = 0        # downstream image training set size (0 = all, whatever pretraining used)
    knn_k: int = 0                   # 0 = suited to the bank (half the smallest class's labelled count, 5..200)
    knn_t: float = 0.1               # kNN vote temperature
    val_frac: float = 0.1            # held out of the labelled set to choose the probe's weight decay
    wd_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    probe_iters: int = 100           # L-BFGS iterations of the linear probe
    finetune_epochs: int = 5
    finetune_lr: float = 0.01        # SGD, backbone and head
    batch_size: int = 256

    def __post_init__(self):
        for key in ("tasks", "protocols", "label_fractions", "wd_grid"):
            if not getattr(self, key):
                raise ConfigError(f"eval.{key}=[]: give at least one (an empty list would write a results file with no rows)")
        self.fluidr3_sf2 = runtime.expand_path(self.fluidr3_sf2)
        runtime.check_range("eval.probe_iters", self.probe_iters, lo=1, hi=100_000)
        runtime.check_range("eval.finetune_epochs", self.finetune_epochs, lo=1, hi=10_000)
        runtime.check_range("eval.finetune_lr", self.finetune_lr, lo=0.0, lo_open=True, hi=100.0)
        runtime.check_range("eval.batch_size", self.batch_size, lo=2, hi=1 << 20)
        runtime.check_range("eval.knn_t", self.knn_t, lo=0.0, lo_open=True, hi=100.0)
        runtime.check_range("eval.max_train_images", self.max_train_images, lo=0)
        for wd in self.wd_grid:
            runtime.check_range("eval.wd_grid", wd, lo=0.0, hi=10.0)
        for t in self.tasks:
            runtime.check_choice("eval.tasks", t, TASKS)
        for p in self.protocols:
            runtime.check_choice("eval.protocols", p, PROTOCOLS)
        for f in self.label_fractions:
            runtime.check_range("eval.label_fractions", f, lo=0.0, hi=1.0, lo_open=True)
        runtime.check_range("eval.val_frac", self.val_frac, lo=0.0, hi=0.5, lo_open=True)
        runtime.check_range("eval.knn_k", self.knn_k, lo=0)


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir=""))  # "" = beside the checkpoint


# ----------------------------------------------------------------------------- features and protocols

@torch.no_grad()
def extract_features(model, md: ModalityData, split: str, modality: str, limit: int = 0, batch_size: int = 512,
                     amp: str = "fp32", normalize: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features h (before the projection head) of a split, fp32, L2-normalised unless
    normalize=False. limit > 0 takes a seeded, class-stratified subset of that many samples (the same one
    for every model and round of a seed). Eval mode, restored afterwards."""
    x = md.train_x if split == "train" else md.test_x
    y = md.train_y if split == "train" else md.test_y
    if limit and limit < len(y):
        keep = torch.from_numpy(stratified_subset(y, limit, runtime.derive_seed(seed, "subset", split))).to(y.device)
        x, y = x[keep], y[keep]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(x), batch_size):
        with autocast(device, amp):
            feats.append(model.features(md.normalize(x[i:i + batch_size]), modality).float())
    model.train(was_training)
    h = torch.cat(feats)
    return (F.normalize(h, dim=1) if normalize else h), y


def suited_k(bank_y: torch.Tensor, k: int = 0) -> int:
    """k for a kNN over this labelled bank: `k` when given, else half the smallest class's count, kept in
    5..200 (k=200 is the ImageNet/CIFAR habit for thousands per class; on 96 clips per class it would vote
    across classes)."""
    if k > 0:
        return k
    smallest = int(torch.bincount(bank_y.cpu()).clamp_min(1).min()) if len(bank_y) else 1
    return max(5, min(200, smallest // 2))


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_y: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Temperature-weighted kNN (Wu et al. 2018, InstDisc): each of the k nearest bank features by
    cosine similarity votes for its label with weight exp(sim / t). Inputs L2-normalised."""
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(queries), chunk):
        sim = queries[i:i + chunk] @ bank.t()  # (q, N)
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_y[idx], torch.exp(w / t))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(model, md: ModalityData, modality: str, bank_size: int = 0, queries: int = 0, k: int = 0,
                 t: float = 0.1, amp: str = "fp32") -> float:
    """kNN top-1 accuracy (%) on the test split with a bank of training features (the pretraining monitor).
    Bank and queries are stratified subsets (0 = all); k=0 suits k to the bank (`suited_k`)."""
    bank, bank_y = extract_features(model, md, "train", modality, bank_size, amp=amp)
    q, q_y = extract_features(model, md, "test", modality, queries, amp=amp)
    pred = knn_predict(bank, bank_y, q, len(md.classes), suited_k(bank_y, k), t)
    return 100.0 * (pred == q_y).float().mean().item()


def probe_accuracy(model, md: ModalityData, modality: str, amp: str = "fp32", max_train: int = 0, seed: int = 0) -> float:
    """The fast linear probe that ends a pretraining run: frozen features of (a stratified `max_train` of) the
    training split, every label, L-BFGS logistic regression with weight decay chosen on a validation split;
    top-1 (%) on the test split."""
    tr, ytr = extract_features(model, md, "train", modality, max_train, amp=amp, normalize=False, seed=seed)
    te, yte = extract_features(model, md, "test", modality, amp=amp, normalize=False)
    n_cls = int(max(ytr.max(), yte.max())) + 1
    return linear_probe(tr, ytr, te, yte, n_cls, EvalConfig(wd_grid=(1e-4, 1e-3, 1e-2)), seed)["acc"]


def label_subset(y: torch.Tensor, frac: float, seed: int) -> torch.Tensor:
    """Indices of a class-stratified `frac` of the labels (at least one per class), fixed by `seed`."""
    if frac >= 1.0:
        return torch.arange(len(y), device=y.device)
    g = torch.Generator().manual_seed(runtime.derive_seed(seed, "labels", frac))
    yc = y.cpu()
    out = []
    for c in yc.unique():
        idx = torch.nonzero(yc == c).flatten()
        n = max(1, int(round(frac * len(idx))))
        out.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(out).sort().values.to(y.device)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, iters: int) -> nn.Linear:
    """Multinomial logistic regression on fixed features, full-batch L-BFGS, L2 penalty wd * ||W||^2."""
    with torch.random.fork_rng(devices=[]):  # a fixed init without touching the caller's RNG
        torch.manual_seed(0)
        clf = nn.Linear(x.shape[1], num_classes).to(x.device)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + wd * clf.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return clf


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int, cfg: EvalConfig, seed: int) -> dict:
    """The standard frozen-feature protocol: standardise features with training statistics, choose the
    weight decay on a held-out split of the labelled set, refit on all of it, report test accuracy (%)."""
    mu, sd = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True).clamp_min(1e-6)
    tr, te = (train_f - mu) / sd, (test_f - mu) / sd
    g = torch.Generator().manual_seed(runtime.derive_seed(seed, "val"))
    perm = torch.randperm(len(tr), generator=g).to(tr.device)
    n_val = int(len(tr) * cfg.val_frac)
    best_wd, best = cfg.wd_grid[0], -1.0
    if n_val >= num_classes and len(cfg.wd_grid) > 1:
        val, fit = perm[:n_val], perm[n_val:]
        for wd in cfg.wd_grid:
            clf = fit_linear(tr[fit], train_y[fit], num_classes, wd, cfg.probe_iters)
            acc = (clf(tr[val]).argmax(1) == train_y[val]).float().mean().item()
            if acc > best:
                best, best_wd = acc, wd
    clf = fit_linear(tr, train_y, num_classes, best_wd, cfg.probe_iters)
    with torch.no_grad():
        acc = 100.0 * (clf(te).argmax(1) == test_y).float().mean().item()
    return {"acc": acc, "wd": best_wd}


def finetune_model(model, md: ModalityData, modality: str, idx: torch.Tensor, data_cfg: DataConfig,
                   cfg: EvalConfig, seed: int, amp: str = "fp32") -> float:
    """Full fine-tuning of a copy of the backbone plus a linear head on the labelled subset (one SimCLR
    view per sample as augmentation); returns test accuracy (%). The given model is not modified."""
    net = copy.deepcopy(model)
    device = next(net.parameters()).device
    head = nn.Linear(net.feat_dim, len(md.classes)).to(device)
    params = list(net.stems.parameters()) + list(net.trunk.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=cfg.finetune_lr, momentum=0.9, weight_decay=5e-4)
    g = runtime.make_generator(device, seed, "finetune", modality)
    steps = max(1, math.ceil(len(idx) / cfg.batch_size)) * cfg.finetune_epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    scaler = runtime.make_scaler(device, amp)  # the same AMP path as pretraining: fp16 needs loss scaling
    net.train()
    for _ in range(cfg.finetune_epochs):
        perm = idx[torch.randperm(len(idx), generator=g, device=device)]
        for b in perm.split(cfg.batch_size):
            if len(b) < 2:
                continue
            x = augment(modality, md.train_x[b], md, data_cfg, g)  # the view in fp32, outside autocast
            with autocast(device, amp):
                logits = head(net.features(x, modality))
            loss = F.cross_entropy(logits.float(), md.train_y[b])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
    f, y = extract_features(net, md, "test", modality, normalize=False, amp=amp)
    with torch.no_grad():
        return 100.0 * (head(f).argmax(1) == y).float().mean().item()


def make_pairs(image_y: torch.Tensor, audio_y: torch.Tensor, seed: int, informative: bool = True) -> torch.Tensor:
    """For every image, the index of a clip to pair it with, drawn with `seed`. informative: a clip of the
    image's own class (AV-Fashion: its class name spoken; the audio carries the label by construction, as in
    AV-MNIST). Not informative (the control): a clip of a class drawn uniformly at random, independent of the
    image, so the audio says nothing about the label. Images whose class no clip has get -1."""
    g = torch.Generator().manual_seed(runtime.derive_seed(seed, "pairs", informative))
    iy, ay = image_y.cpu(), audio_y.cpu()
    out = torch.full((len(iy),), -1, dtype=torch.long)
    classes = iy.unique()
    if not informative:  # the clip's class: uniform over the image classes, whatever the image shows
        iy = classes[torch.randint(len(classes), (len(iy),), generator=g)]
    for c in classes:
        clips = torch.nonzero(ay == c).flatten()
        where = torch.nonzero(iy == c).flatten()
        if len(clips):
            out[where] = clips[torch.randint(len(clips), (len(where),), generator=g)]
    return out.to(image_y.device)


def fuse(h_image: torch.Tensor, h_audio: torch.Tensor) -> torch.Tensor:
    """Fused audio+image features ("auxiliary information"): both through the same backbone, each half
    L2-normalised (so neither modality dominates by its feature scale), then concatenated. (N, D) + (N, D) -> (N, 2D)."""
    return torch.cat([F.normalize(h_image, dim=1), F.normalize(h_audio, dim=1)], dim=1)


# ----------------------------------------------------------------------------- checkpoint loading

def load_backbone(ckpt_path, random_init: bool = False, seed: int = 0, device="cpu"):
    """Rebuild the model from a pretraining checkpoint's config and load its backbone (keys under
    BACKBONE_PREFIXES). The checkpoint must hold exactly the backbone keys the model expects, plus
    projection-head keys (ignored): anything missing or unexpected is an error. With random_init the
    same architecture is returned untrained (seeded). Returns (model, checkpoint)."""
    ck = runtime.load_checkpoint(ckpt_path)
    try:
        mcfg = runtime.build_dataclass(ModelConfig, ck["config"]["model"], "model.")
        shapes = {m: tuple(s) for m, s in ck["input_shapes"].items()}
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{ckpt_path}: checkpoint lacks a valid model config / input shapes ({e})") from e
    with torch.random.fork_rng(devices=[]):  # a seeded init without touching the caller's RNG
        torch.manual_seed(runtime.derive_seed(seed, "random_init"))
        model = build_model(mcfg, shapes).to(device)
    if random_init:
        return model, ck
    want = {k for k in model.state_dict() if k.startswith(BACKBONE_PREFIXES)}
    have = {k for k in ck["model"] if k.startswith(BACKBONE_PREFIXES)}
    unexpected = sorted(k for k in ck["model"] if not k.startswith(BACKBONE_PREFIXES + IGNORED_PREFIXES)) + \
        sorted(have - want)
    missing = sorted(want - have)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path}: backbone keys do not match the model built from its config: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: checkpoint {tuple(ck['model'][k].shape)} vs model {tuple(v.shape)}" for k, v in model.state_dict().items()
             if k in want and tuple(ck["model"][k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{ckpt_path}: tensor shapes do not match the model built from its config "
                              f"(edited config or another model's weights): {'; '.join(wrong[:3])}")
    result = model.load_state_dict({k: ck["model"][k] for k in want}, strict=False)
    assert all(k.startswith(IGNORED_PREFIXES) for k in result.missing_keys) and not result.unexpected_keys
    return model, ck


# ----------------------------------------------------------------------------- the evaluation

def fluidr3_data(cfg: FinetuneConfig, device, log=print) -> Optional[ModalityData]:
    """The out-of-domain audio task: GM instrument notes rendered from the FluidR3 soundfont (16
    families, unseen instruments in the test split), through the pretraining's audio front-end."""
    from readers import FLUIDR3_SF2, load_named
    sf2 = cfg.eval.fluidr3_sf2 or FLUIDR3_SF2
    if not Path(sf2).is_file() or not shutil.which("fluidsynth"):
        log(f"skipping the fluidr3 task: needs fluidsynth and {sf2} (sudo apt-get install fluidsynth fluid-soundfont-gm)")
        return None
    dc = replace(cfg.data, dataset="cifar10+fluidr3", modalities=("audio",), audio_root=sf2, clip_seconds=1.0,
                 max_train_images=0)
    return load_named(dc, device)["audio"]


def evaluate(model, data: dict[str, ModalityData], cfg: FinetuneConfig, device, log=print) -> list[dict]:
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
        from readers import PAIRED_DATASETS
        if cfg.data.dataset in PAIRED_DATASETS:  # real pairs: image i and clip i come from one video
            ptr, pte = torch.arange(len(iytr), device=iytr.device), torch.arange(len(iyte), device=iyte.device)
        else:  # AV-Fashion: each image with a clip of its spoken class name
            ptr, pte = make_pairs(iytr, aytr, seed), make_pairs(iyte, ayte, seed + 1)
        if (ptr < 0).any() or (pte < 0).any():
            raise DataError("paired task: some image classes have no spoken clip of their class name")
        sets["paired/image"] = ("paired", itr, iytr, ite, iyte)
        sets["paired/audio"] = ("paired", atr[ptr], iytr, ate[pte], iyte)
        sets["paired/fused"] = ("paired", fuse(itr, atr[ptr]), iytr, fuse(ite, ate[pte]), iyte)
        if cfg.data.dataset not in PAIRED_DATASETS:
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
                    acc = linear_probe(tr[sub], ytr[sub], te, yte, n_cls, ec, seed)["acc"]
                elif proto == "knn":
                    pred = knn_predict(F.normalize(tr[sub], dim=1), ytr[sub], F.normalize(te, dim=1), n_cls,
                                       suited_k(ytr[sub], ec.knn_k), ec.knn_t)
                    acc = 100.0 * (pred == yte).float().mean().item()
                else:
                    if task == "paired":
                        continue  # fine-tuning is defined for the single-modality tasks
                    md_m = "audio" if feat_kind == "fluidr3" else feat_kind
                    acc = finetune_model(model, data[feat_kind], md_m, sub, cfg.data, ec, seed, cfg.run.amp)
                rows.append({"task": task, "features": "audio" if feat_kind == "fluidr3" else feat_kind,
                             "protocol": proto, "label_frac": frac,
                             "acc": round(acc, 3), "n_train": len(sub), "n_test": len(yte)})
                log(f"{task:7s} {feat_kind:6s} {proto:8s} {frac:>5.0%} labels: {acc:6.2f}%")
    return rows


def markdown_table(rows: list[dict], title: str = "") -> str:
    """task | features | protocol | one column per label fraction."""
    fracs = sorted({r["label_frac"] for r in rows})
    keys = list(dict.fromkeys((r["task"], r["features"], r["protocol"]) for r in rows))
    acc = {(r["task"], r["features"], r["protocol"], r["label_frac"]): r["acc"] for r in rows}
    out = [f"### {title}", ""] if title else []
    out.append("| task | features | protocol | " + " | ".join(f"{f:.0%} labels" for f in fracs) + " |")
    out.append("|---|---|---|" + "---|" * len(fracs))
    for k in keys:
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(
            f"{acc[(*k, f)]:.2f}" if (*k, f) in acc else "-" for f in fracs) + " |")
    return "\n".join(out) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Override any key as --section.key=value (sections: eval, run, data).")
    p.add_argument("config", nargs="?", help="optional YAML with eval/run/data sections")
    p.add_argument("--ckpt", required=True, help="pretraining checkpoint (RUN_DIR/last.pt) or its run directory")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture untrained")
    return runtime.parse_with_overrides(p, argv)


def check_inputs(data: dict[str, ModalityData], ck: dict, cfg: FinetuneConfig) -> None:
    """The backbone only fits the inputs it was trained on: compare the data's input shapes with the
    checkpoint's and name the data options that differ."""
    trained = {m: tuple(s) for m, s in ck["input_shapes"].items()}
    bad = {m: (md.shape, trained[m]) for m, md in data.items() if m in trained and tuple(md.shape) != trained[m]}
    if bad:
        was = ck["config"].get("data", {})
        now = runtime.to_dict(cfg.data)
        keys = [f"data.{k}={now[k]!r} (checkpoint: {was[k]!r})" for k in sorted(now) if k in was and now[k] != was[k]
                and not isinstance(now[k], dict)]
        shapes = "; ".join(f"{m} inputs are {tuple(a)} but the checkpoint was trained on {tuple(b)}" for m, (a, b) in bad.items())
        raise ConfigError(f"{shapes}. " + (f"Options that differ: {', '.join(keys)}" if keys else
                                          "Use the data options the checkpoint was trained with"))


def main(argv=None) -> dict:
    return runtime.run_main(_main, sys.argv[1:] if argv is None else argv)


def _main(argv) -> dict:
    args, overrides = parse_args(argv)
    ckpt_path = Path(runtime.expand_path(args.ckpt))
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "last.pt"
    ck = runtime.load_checkpoint(ckpt_path)
    raw = {}
    if args.config:
        raw = runtime.read_yaml(args.config)
    data_raw = dict(ck["config"]["data"])
    data_raw.update(raw.pop("data", {}) or {})
    data_raw["modalities"] = list(ck["input_shapes"])  # the tasks the backbone has stems for
    raw["data"] = data_raw
    runtime.apply_overrides(raw, overrides)
    cfg = runtime.build_dataclass(FinetuneConfig, raw)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    runtime.seed_everything(cfg.run.seed, cfg.run.deterministic)
    device = runtime.resolve_device(cfg.run.device)
    cfg.data.max_train_images = cfg.eval.max_train_images
    model, _ = load_backbone(ckpt_path, args.random_init, cfg.run.seed, device)
    data = load_data(cfg.data, device, progress=cfg.run.progress and sys.stderr.isatty())
    check_inputs(data, ck, cfg)
    for m, st in ck.get("input_stats", {}).items():  # normalise exactly as in pretraining
        if m in data:
            data[m].mean = torch.tensor(st["mean"], device=device)
            data[m].std = torch.tensor(st["std"], device=device)

    t = runtime.Timer()
    rows = evaluate(model, data, cfg, device)
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else ckpt_path.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise runtime.RunDirError(f"cannot write results to {out_dir}: {e.strerror or e}") from e
    stem = "results_random_init" if args.random_init else "results"
    result = {"ckpt": str(ckpt_path), "random_init": args.random_init, "round": ck["round"],
              "model": ck["config"]["model"], "pretrain_modalities": list(ck["input_shapes"]),
              "config": runtime.to_dict(cfg), "seed": cfg.run.seed, "seconds": round(t(), 1), "rows": rows,
              "env": runtime.environment_info(device)}
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    title = f"{ckpt_path} ({'random init' if args.random_init else 'round ' + str(ck['round'])}, seed {cfg.run.seed})"
    (out_dir / f"{stem}.md").write_text(markdown_table(rows, title))
    print(markdown_table(rows, title))
    print(f"results in {out_dir}/{stem}.json and {stem}.md")
    return result


if __name__ == "__main__":
    main()
