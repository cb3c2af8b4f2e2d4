"""Evaluation primitives on a frozen (or fine-tuned) backbone, shared by pretraining's monitor and finetune.py:
features, temperature-weighted kNN, the linear probe (L-BFGS, weight decay chosen on a validation split), full
fine-tuning, paired-task fusion, and loading a checkpoint's backbone by explicit key prefix.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime
from checkpoints import CheckpointError, load_checkpoint
from data import ModalityData, stratified_subset
from modality_specs import augment
from models import ModelConfig, build_model
from runtime import autocast
from settings import ConfigError, build_dataclass

BACKBONE_PREFIXES = ("stems.", "trunk.")   # what downstream tasks take from a checkpoint
IGNORED_PREFIXES = ("heads.",)             # present in a checkpoint, not used downstream


@torch.no_grad()
def extract_features(model, md: ModalityData, split: str, modality: str, *, limit: int = 0, batch_size: int = 512,
                     amp: str = "fp32", normalize: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features h (before the projection head) of a split, fp32, L2-normalised unless
    normalize=False. limit > 0 takes a seeded, class-stratified subset of that many samples (the same one
    for every model and round of a seed). Eval mode, restored afterwards."""
    y = md.train_y if split == "train" else md.test_y
    keep = None
    if limit and limit < len(y):
        keep = torch.from_numpy(stratified_subset(y, limit, runtime.derive_seed(seed, "subset", split))).to(y.device)
        y = y[keep]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(y), batch_size):  # a batch at a time from any residency tier
        x = md.take(split, slice(i, i + batch_size) if keep is None else keep[i:i + batch_size], device)
        with autocast(device, amp):
            feats.append(model.features(md.normalize(x), modality).float())
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
def knn_predict(bank: torch.Tensor, bank_y: torch.Tensor, queries: torch.Tensor, num_classes: int, *,
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


def standardize(bank: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature dimension by the bank's statistics, then L2-normalise, for cosine kNN.
    Backbone features are non-negative (ReLU, pooling): raw, their pairwise cosines all sit near 1 and kNN mostly
    reads one shared direction. The same transform is applied to the raw-input baseline."""
    mu, sd = bank.mean(0, keepdim=True), bank.std(0, keepdim=True).clamp_min(1e-6)
    return [F.normalize((t - mu) / sd, dim=1) for t in (bank, *others)]


def knn_accuracy(model, md: ModalityData, modality: str, *, bank_size: int = 0, queries: int = 0, k: int = 0,
                 t: float = 0.1, amp: str = "fp32", seed: int = 0) -> float:
    """kNN top-1 accuracy (%) on the test split with a bank of training features, standardised by the bank's
    statistics (the pretraining monitor). Bank and queries are stratified subsets (0 = all); k=0 suits k to the
    bank (`suited_k`)."""
    bank, bank_y = extract_features(model, md, "train", modality, limit=bank_size, amp=amp, normalize=False, seed=seed)
    q, q_y = extract_features(model, md, "test", modality, limit=queries, amp=amp, normalize=False, seed=seed)
    bank, q = standardize(bank, q)
    pred = knn_predict(bank, bank_y, q, len(md.classes), k=suited_k(bank_y, k), t=t)
    return 100.0 * (pred == q_y).float().mean().item()


def probe_accuracy(model, md: ModalityData, modality: str, *, amp: str = "fp32", max_train: int = 0, seed: int = 0) -> float:
    """The fast linear probe that ends a pretraining run: frozen features of (a stratified `max_train` of) the
    training split, every label, L-BFGS logistic regression with weight decay chosen on a validation split;
    top-1 (%) on the test split."""
    tr, ytr = extract_features(model, md, "train", modality, limit=max_train, amp=amp, normalize=False, seed=seed)
    te, yte = extract_features(model, md, "test", modality, amp=amp, normalize=False)
    n_cls = int(max(ytr.max(), yte.max())) + 1
    return linear_probe(tr, ytr, te, yte, n_cls, seed=seed, wd_grid=(1e-4, 1e-3, 1e-2))["acc"]


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


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int, *, seed: int, val_frac: float = 0.1,
                 wd_grid=(1e-5, 1e-4, 1e-3, 1e-2), iters: int = 100) -> dict:
    """The standard frozen-feature protocol: standardise features with training statistics, choose the
    weight decay on a held-out split of the labelled set, refit on all of it, report test accuracy (%)."""
    mu, sd = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True).clamp_min(1e-6)
    tr, te = (train_f - mu) / sd, (test_f - mu) / sd
    g = torch.Generator().manual_seed(runtime.derive_seed(seed, "val"))
    perm = torch.randperm(len(tr), generator=g).to(tr.device)
    n_val = int(len(tr) * val_frac)
    best_wd, best = wd_grid[0], -1.0
    if n_val >= num_classes and len(wd_grid) > 1:
        val, fit = perm[:n_val], perm[n_val:]
        for wd in wd_grid:
            clf = fit_linear(tr[fit], train_y[fit], num_classes, wd, iters)
            acc = (clf(tr[val]).argmax(1) == train_y[val]).float().mean().item()
            if acc > best:
                best, best_wd = acc, wd
    clf = fit_linear(tr, train_y, num_classes, best_wd, iters)
    with torch.no_grad():
        acc = 100.0 * (clf(te).argmax(1) == test_y).float().mean().item()
    return {"acc": acc, "wd": best_wd}


def finetune_model(model, md: ModalityData, modality: str, idx: torch.Tensor, *, data_cfg,
                   cfg, seed: int, amp: str = "fp32") -> float:
    """Full fine-tuning of a copy of the backbone plus a linear head on the labelled subset (one SimCLR
    view per sample as augmentation); returns test accuracy (%). The given model is not modified."""
    net = copy.deepcopy(model)
    device = next(net.parameters()).device
    head = nn.Linear(net.feat_dims[modality], len(md.classes)).to(device)
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
            x = augment(modality, md.take("train", b, device), md, data_cfg, g)  # the view in fp32, outside autocast
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


class RawInput(nn.Module):
    """The raw-input baseline as a "backbone": features(x) = the input itself, normalised as in pretraining and
    flattened (784 pixels, 1632 log-mel bins on AV-Fashion). Every probe, kNN and fusion then treats it exactly as
    a model's features: same splits, same standardisation, same classifier."""

    def __init__(self, shapes: dict, device="cpu"):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(0, device=device))  # tells extract_features the device
        self.feat_dims = {m: math.prod(s) for m, s in shapes.items()}

    def parameters(self, recurse: bool = True):
        yield self.anchor

    def features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return x.float().flatten(1)


def load_backbone(ckpt_path, random_init: bool = False, seed: int = 0, device="cpu"):
    """Rebuild the model from a pretraining checkpoint's config and load its backbone (keys under
    BACKBONE_PREFIXES). The checkpoint must hold exactly the backbone keys the model expects, plus
    projection-head keys (ignored): anything missing or unexpected is an error. With random_init the
    same architecture is returned untrained (seeded). Returns (model, checkpoint)."""
    ck = load_checkpoint(ckpt_path)
    try:
        mcfg = build_dataclass(ModelConfig, ck["config"]["model"], "model.")
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


