"""A client's local training: the optimiser and its schedule over rounds, the local batch schedule, and
`local_ssl_update`, E local epochs of the configured SSL objective (losses.py) on one client's unlabelled data,
in place on the one model a process reuses for every client. Both views of a batch are made on the device by the
modality's augmentation (modality_specs.py) with per-sample parameters from an explicit generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from losses import OBJECTIVES, LossConfig
from modality_specs import MODALITY_SPECS, augment
from models import reset_bn_stats
from runtime import Interrupted, autocast, derive_seed  # noqa: F401 - Interrupted: raised here, caught by callers
from settings import check_choice, check_range


@dataclass
class OptimConfig:
    name: str = "sgd"                  # sgd | adamw
    lr: float = 0.05                   # base LR per 256 samples: effective lr = lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4         # not applied to biases and norm parameters
    batch_size: int = 256              # local batch size (images; audio too unless batch_size_audio is set)
    batch_size_audio: int = 0          # local audio batch size; 0 = batch_size (audio sets are often far smaller)
    schedule: str = "cosine"           # cosine | constant, over rounds
    warmup_rounds: int = 0
    min_lr_frac: float = 0.0           # cosine floor as a fraction of the peak
    grad_clip: float = 0.0             # max grad norm (0 = off)
    reset_state: bool = True           # FedAvg: a client's optimiser state (momentum) starts fresh every round; false
                                       # keeps it across rounds (one client only: the centralised bound, fed.budget_of)

    def __post_init__(self):
        check_choice("optim.name", self.name, ("sgd", "adamw"))
        check_choice("optim.schedule", self.schedule, ("cosine", "constant"))
        check_range("optim.lr", self.lr, lo=0.0, lo_open=True, hi=10.0)  # per 256 samples; SimCLR's LARS uses 0.3
        check_range("optim.batch_size", self.batch_size, lo=2, hi=1 << 20)
        if self.batch_size_audio:
            check_range("optim.batch_size_audio", self.batch_size_audio, lo=2, hi=1 << 20)
        check_range("optim.momentum", self.momentum, lo=0, hi=0.9999)
        check_range("optim.weight_decay", self.weight_decay, lo=0, hi=1.0)
        check_range("optim.warmup_rounds", self.warmup_rounds, lo=0)
        check_range("optim.min_lr_frac", self.min_lr_frac, lo=0, hi=1.0)
        check_range("optim.grad_clip", self.grad_clip, lo=0)

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256

    def batch_for(self, modality: str) -> int:
        return MODALITY_SPECS[modality].batch_size(self)


def lr_at(round_idx: int, cfg: OptimConfig, rounds: int) -> float:
    """LR for round `round_idx` (1-based): linear warmup, then cosine (or constant) down to min_lr_frac."""
    peak = cfg.peak_lr
    if round_idx <= cfg.warmup_rounds:
        return peak * round_idx / (cfg.warmup_rounds + 1)
    if cfg.schedule == "constant":
        return peak
    t = (round_idx - 1 - cfg.warmup_rounds) / max(1, rounds - cfg.warmup_rounds)
    return peak * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, foreach: Optional[bool] = None) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.momentum, foreach=foreach)
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, foreach=foreach)


def batch_schedule(sizes: dict[str, int], batch_size: int | dict[str, int], order: str) -> list[tuple[str, ...]]:
    """The modality (or modalities, for order=sum) of each local step of one epoch. alternate: one
    step per single-modality batch, modalities interleaved in proportion to their batch counts;
    sum: max(batches) steps, each on one batch of every held modality (the smaller one cycles).
    batch_size: one for all modalities or {modality: size}."""
    bs = batch_size if isinstance(batch_size, dict) else {m: batch_size for m in sizes}
    nb = {m: max(1, n // bs[m]) for m, n in sizes.items() if n >= 2}
    if not nb:
        return []
    if order == "sum":
        return [tuple(nb)] * max(nb.values())
    return interleave(nb)


def interleave(counts: dict[str, int]) -> list[tuple[str, ...]]:
    """`counts[m]` single-modality steps of each modality, spread evenly over the epoch: step i of m at (i + 0.5) / n."""
    slots = sorted(((i + 0.5) / n, m) for m, n in counts.items() for i in range(n))
    return [(m,) for _, m in slots]


def _batches(n: int, batch_size: int, g: torch.Generator, device) -> list[torch.Tensor]:
    """A shuffled epoch of index batches; the last partial batch is dropped unless it is the only one."""
    perm = torch.randperm(n, generator=g, device=device)
    if n <= batch_size:
        return [perm]
    return list(perm[: n // batch_size * batch_size].split(batch_size))


def stream_batches(n: int, sizes: list[int], offset: int, seed: int, key: str, device) -> list[torch.Tensor]:
    """Batches of the given sizes taken one after another from sample `offset` of an endless stream of epochs over
    n samples, epoch e a permutation drawn from (seed, key, e); a batch may straddle two epochs. A pure function
    of its arguments, so a run that takes `sizes` per round continues the same stream after a resume."""
    perms: dict[int, torch.Tensor] = {}

    def perm(e: int) -> torch.Tensor:
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "stream", key, e)))
        return perms[e]
    out = []
    for size in sizes:
        k = torch.arange(offset, offset + size)
        out.append(torch.cat([perm(e)[k[k // n == e] % n] for e in range(offset // n, (offset + size - 1) // n + 1)])
                   .to(device))
        offset += size
    return out


@dataclass
class LocalSettings:
    """Everything a client's local training reads besides the model, its data and the round: the sections of the
    run's config it needs, and the strategy's client-side hook (FedProx's proximal term, or None)."""
    data: object                   # DataConfig: each modality's augmentation section
    optim: OptimConfig
    loss: LossConfig
    local_epochs: int = 1          # E
    order: str = "alternate"       # alternate: one step per single-modality batch | sum: one step on all modalities
    cross_modal_negatives: bool = False
    amp: str = "fp32"
    hook: Optional[object] = None  # start(model) once, penalty(model) -> tensor added to every step's loss

    @classmethod
    def of(cls, cfg, hook=None) -> "LocalSettings":
        """From a run's config (the data, optim, loss, fed and run sections)."""
        return cls(cfg.data, cfg.optim, cfg.loss, cfg.fed.local_epochs, cfg.fed.order, cfg.fed.cross_modal_negatives,
                   cfg.run.amp, hook)


def _views(model, data, indices, queues, mods, bs, sizes, s: LocalSettings, g, device, fwd) -> dict:
    """Both views of one batch of each modality in `mods`, embedded: {modality: (z1, z2)}."""
    embeds = {}
    for m in mods:
        if not queues[m]:
            queues[m] = _batches(sizes[m], bs[m], g, device)
        x = data[m].train_x[indices[m][queues[m].pop(0)]]
        # views in fp32 outside autocast (blur and colour maths in bf16 would quantise them)
        v = torch.cat([augment(m, x, data[m], s.data, g), augment(m, x, data[m], s.data, g)])
        with autocast(device, s.amp):
            z = model(v, m)  # (2B, D): both views in one pass
        fwd[m] += len(z)
        embeds[m] = z.chunk(2)
    return embeds


def local_ssl_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, data: dict,
                     indices: dict[str, torch.Tensor], s: LocalSettings, lr: float, g: torch.Generator,
                     should_stop: Optional[Callable[[], bool]] = None, max_steps: int = 0,
                     batches: Optional[dict[str, list[torch.Tensor]]] = None) -> dict:
    """E local epochs of the configured objective on one client's unlabelled data ({modality: indices into
    data[modality].train_x}), in place on `model`. Returns loss means per modality (a non-finite mean marks the
    update for rejection), the step count and the samples forwarded per modality. `should_stop` is polled after
    every step; when it returns True the step finishes and Interrupted is raised. max_steps > 0 stops after that
    many steps (dry runs). batches: instead of E epochs, exactly these batches ({modality: [positions into
    indices[modality]]}, order=alternate), interleaved in proportion (the centralised bound's round)."""
    device = next(model.parameters()).device
    model.train()
    reset_bn_stats(model, tuple(indices))  # cumulative BN statistics describe this client's round
    if s.optim.reset_state:
        optimizer.state.clear()  # FedAvg: local optimizer state starts fresh on every client
    for group in optimizer.param_groups:
        group["lr"] = lr
    objective = OBJECTIVES[s.loss.name].loss
    sizes = {m: len(indices[m]) for m in indices}
    loss_sum = {m: torch.zeros((), device=device) for m in indices}
    loss_cnt = {m: 0 for m in indices}
    fwd = {m: 0 for m in indices}  # samples forwarded (both views), for the measured forward FLOPs
    if s.hook is not None:
        s.hook.start(model)
    steps = 0
    for _ in range(1 if batches is not None else s.local_epochs):
        bs = {m: MODALITY_SPECS[m].batch_size(s.optim) for m in indices}
        if batches is not None:
            schedule = interleave({m: len(b) for m, b in batches.items()})
            queues = {m: list(b) for m, b in batches.items()}
        else:
            schedule = batch_schedule(sizes, bs, s.order)
            queues = {m: [] for m in indices}
        if max_steps:
            schedule = schedule[:max(0, max_steps - steps)]
        for mods in schedule:
            embeds = _views(model, data, indices, queues, mods, bs, sizes, s, g, device, fwd)
            losses = objective(embeds, s.loss, s.cross_modal_negatives)
            loss = sum(losses.values())
            if s.hook is not None:
                loss = loss + s.hook.penalty(model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if s.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            for m, l in losses.items():
                loss_sum[m] += l.detach()
                loss_cnt[m] += 1
            steps += 1
            if should_stop is not None and should_stop():
                raise Interrupted
    out = {f"loss_{m}": (loss_sum[m] / loss_cnt[m]).item() for m in indices if loss_cnt[m]}
    out["steps"] = steps
    out.update({f"fwd_{m}": n for m, n in fwd.items()})
    return out
