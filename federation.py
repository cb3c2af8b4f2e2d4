"""Federated self-supervised training: client sampling, the local SSL update, aggregation, one round.

The round logic (`run_round`) only sees state dicts and a `local_update(client_id) -> ClientUpdate`
callable, so it is tested with a dummy update; `local_ssl_update` is the real one. One model and one
optimizer are reused across clients: each client loads the global weights into the same model, trains,
and its weights are folded into a running weighted sum before the next client starts (no copies).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from data import DataConfig, ModalityData, augment
from models import key_modality, nt_xent, reset_bn_stats
from runtime import ConfigError, autocast, check_choice, check_range, derive_seed


@dataclass
class FedConfig:
    clients: int = 100                  # N
    clients_per_round: int = 10         # K
    rounds: int = 100                   # R
    local_epochs: int = 1               # E
    partition: str = "dirichlet"        # iid | dirichlet | pathological | natural (speaker/fold/kit ids as clients where the data has them)
    alpha: float = 0.1                  # Dirichlet concentration (label skew inside each modality)
    min_client_size: int = 2            # smallest number of samples a client may hold per modality
    classes_per_client: int = 2         # pathological partition: shards (about classes) per client
    modality_fractions: tuple[float, float, float] = (0.4, 0.4, 0.2)  # clients holding image only, audio only, both
    federation: str = "joint"           # joint: clients hold modalities by modality_fractions even in a one-modality run, so
                                        # the image-only / audio-only baselines train on FSSUAVL's exact clients and rounds
                                        # (a sampled client without the modality sits the round out); single: with one
                                        # modality, every client holds it (a plain single-modality federation)
    order: str = "alternate"            # alternate: one step per single-modality batch; sum: one step on L_img + L_aud
    cross_modal_negatives: bool = False  # with order=sum: the other modality's embeddings are extra negatives
    share_head: bool = True             # the server averages the projection head (else it stays on each client)
    weighting: str = "modality"         # modality: a modality's own keys (stem, head, BN stats) are weighted by that
                                        # modality's local samples; total: every key by all local samples (plain FedAvg)
    aggregation: str = "fedavg"         # server strategy, a key of federation.STRATEGIES: fedavg | fedprox | fedavgm | ldawa |
                                        # median | trimmed_mean (see README "Server strategies")
    trim_frac: float = 0.1              # trimmed_mean: fraction cut from each end per coordinate
    prox_mu: float = 0.0                # FedProx: mu of the proximal term mu/2 ||w - w_global||^2 in the local loss (0 = off)
    server_momentum: float = 0.9        # FedAvgM: beta of the server momentum on the pseudo-gradient
    server_lr: float = 1.0              # FedAvgM: server learning rate

    def __post_init__(self):
        check_range("fed.clients", self.clients, lo=1, hi=1_000_000)
        check_range("fed.clients_per_round", self.clients_per_round, lo=1)
        if self.clients_per_round > self.clients:
            raise ConfigError(f"fed.clients_per_round={self.clients_per_round} is larger than fed.clients={self.clients}")
        check_range("fed.rounds", self.rounds, lo=1, hi=1_000_000)
        check_range("fed.local_epochs", self.local_epochs, lo=1, hi=10_000)
        check_choice("fed.partition", self.partition, ("iid", "dirichlet", "pathological", "natural"))
        check_range("fed.classes_per_client", self.classes_per_client, lo=1)
        check_range("fed.alpha", self.alpha, lo=0.0, lo_open=True, hi=1e6)
        check_range("fed.min_client_size", self.min_client_size, lo=1, hi=1_000_000)
        check_choice("fed.order", self.order, ("alternate", "sum"))
        check_choice("fed.federation", self.federation, ("joint", "single"))
        check_choice("fed.weighting", self.weighting, ("modality", "total"))
        check_choice("fed.aggregation", self.aggregation, tuple(STRATEGIES))
        check_range("fed.prox_mu", self.prox_mu, lo=0.0, hi=1e4)
        check_range("fed.server_momentum", self.server_momentum, lo=0.0, hi=0.999)
        check_range("fed.server_lr", self.server_lr, lo=0.0, lo_open=True, hi=100.0)
        check_range("fed.trim_frac", self.trim_frac, lo=0.0, hi=0.49)
        if len(self.modality_fractions) != 3 or min(self.modality_fractions) < 0 or sum(self.modality_fractions) <= 0:
            raise ConfigError(f"fed.modality_fractions={list(self.modality_fractions)}: expected three non-negative "
                              f"fractions (image only, audio only, both) with a positive sum")
        if self.cross_modal_negatives and self.order != "sum":
            raise ConfigError("fed.cross_modal_negatives=true needs fed.order=sum (both modalities in one step)")


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

    def __post_init__(self):
        check_choice("optim.name", self.name, ("sgd", "adamw"))
        check_choice("optim.schedule", self.schedule, ("cosine", "constant"))
        check_range("optim.lr", self.lr, lo=0.0, lo_open=True, hi=1000.0)
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
        return self.batch_size_audio if modality == "audio" and self.batch_size_audio else self.batch_size


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


# ----------------------------------------------------------------------------- sampling and aggregation

def sample_clients(eligible: list[int], k: int, seed: int, round_idx: int) -> list[int]:
    """K distinct clients for a round, a pure function of (seed, round): resume needs no sampler state."""
    rng = np.random.default_rng(derive_seed(seed, "sample", round_idx))
    return sorted(int(c) for c in rng.choice(np.asarray(eligible), size=min(k, len(eligible)), replace=False))


def is_shared(name: str, share_head: bool = True) -> bool:
    """What the server aggregates: everything, except the projection head(s) when share_head=False."""
    return share_head or not name.startswith("heads.")


class WeightedAverage:
    """Streaming FedAvg: fold each client's state dict in as it arrives (sum of w_k * theta_k in fp64
    for floating tensors), divide once at the end. The weight may differ per key (a callable); a key
    with weight 0 is left out for that client. Integer buffers (BatchNorm's num_batches_tracked) are
    copied from the first client that contributes them, not averaged."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.totals: dict[str, float] = {}

    def add(self, state: dict[str, torch.Tensor], weight: float | Callable[[str], float]) -> None:
        for k, v in state.items():
            w = float(weight(k) if callable(weight) else weight)
            if w < 0:
                raise ValueError(f"client weight for {k} must be non-negative, got {w}")
            if w == 0:
                continue
            if not v.is_floating_point():
                self.sums.setdefault(k, v.detach().clone())
            elif k in self.sums:
                self.sums[k].add_(v.detach().double(), alpha=w)
            else:
                self.sums[k] = v.detach().double() * w
            self.totals[k] = self.totals.get(k, 0.0) + w

    def result(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The average of every key that received a positive weight, cast to the dtypes/devices of
        `like` (the previous global state)."""
        if not self.sums:
            raise ValueError("no client update was aggregated")
        return {k: (s / self.totals[k] if s.is_floating_point() else s).to(like[k].dtype).to(like[k].device)
                for k, s in self.sums.items()}


class CoordinateRobust:
    """Coordinate-wise median or trimmed mean of the client states (Yin et al. 2018), unweighted: a few
    broken or hostile clients cannot drag a coordinate arbitrarily far. Needs every client's copy, so
    it holds K states at once (FedAvg streams). A client whose weight for a key is 0 (it never touched
    that key) is left out of that key, as in WeightedAverage; integer buffers are copied from the first."""

    def __init__(self, kind: str = "median", trim_frac: float = 0.1):
        self.kind, self.trim_frac = kind, trim_frac
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, state: dict[str, torch.Tensor], weight: float | Callable[[str], float]) -> None:
        for k, v in state.items():
            if float(weight(k) if callable(weight) else weight) > 0:
                self.values.setdefault(k, []).append(v.detach().clone())

    def result(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.values:
            raise ValueError("no client update was aggregated")
        out = {}
        for k, vs in self.values.items():
            if not vs[0].is_floating_point():
                out[k] = vs[0]
                continue
            x = torch.stack([v.double() for v in vs])  # (K, ...)
            if self.kind == "median":
                # mean of the two middle values for even K (torch.median would take the lower one)
                srt = x.sort(dim=0).values
                n = len(vs)
                r = (srt[(n - 1) // 2] + srt[n // 2]) / 2
            else:
                cut = int(self.trim_frac * len(vs))
                r = x.sort(dim=0).values[cut:len(vs) - cut].mean(dim=0)
            out[k] = r.to(like[k].dtype).to(like[k].device)
        return out


class LayerCosineAverage:
    """L-DAWA's aggregation (Rehman et al., ICCV 2023), following the authors' L-DAWA-Agg.py
    (yasar-rehman/L-DAWA):
    - a layer is each tensor of the shared state with at least one dimension: weights, biases, norm affines and
      BatchNorm running statistics alike (their code takes every non-scalar array of the Flower weights list);
      scalar and integer buffers (num_batches_tracked) are copied, not scaled (theirs: retained as they are);
    - each client layer is multiplied by its cosine similarity with the global layer, clipped above at 1 (theirs
      clips too); a zero-norm client layer keeps weight 1 (theirs leaves it unchanged), and so does a zero-norm
      global layer, where theirs would divide by zero;
    - the scaled layers are summed and divided by the number of clients that sent the layer: no sample-count
      weighting and no normalisation by the cosines (theirs: reduce(np.add) / total_clients), so divergent
      clients shrink the update. Under fed.weighting=modality a client is left out of a key it did not train."""

    def __init__(self, global_state: dict[str, torch.Tensor]):
        self.g = global_state
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, state: dict[str, torch.Tensor], weight: float | Callable[[str], float]) -> None:
        for k, v in state.items():
            if float(weight(k) if callable(weight) else weight) <= 0:
                continue
            if not v.is_floating_point():
                self.sums.setdefault(k, v.detach().clone())
                self.counts[k] = 1
                continue
            x = v.detach().double()
            if x.ndim >= 1:
                g = self.g[k].detach().double()
                nx, ng = x.norm(), g.norm()
                cos = (x * g).sum() / (nx * ng).clamp_min(1e-300)
                x = x * torch.where((nx > 0) & (ng > 0), cos, torch.ones_like(cos)).clamp(max=1.0)
            self.sums[k] = self.sums[k] + x if k in self.sums else x
            self.counts[k] = self.counts.get(k, 0) + 1

    def result(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.sums:
            raise ValueError("no client update was aggregated")
        return {k: (s / self.counts[k] if s.is_floating_point() else s).to(like[k].dtype).to(like[k].device)
                for k, s in self.sums.items()}


# ----------------------------------------------------------------------------- server strategies

class Strategy:
    """A server strategy, in the spirit of Flower's aggregate.py: each round `accumulator` returns the object
    that folds client states in as they arrive (so clients can stream), and `step` turns it and the previous
    global state into the new global tensors. State kept across rounds lives in `state_dict` and is saved in
    last.pt, so --resume stays bit-identical. A new strategy is one subclass and one STRATEGIES entry."""

    def __init__(self, fed: "FedConfig", param_keys=()):
        self.fed, self.param_keys = fed, set(param_keys)

    def accumulator(self, global_state: dict[str, torch.Tensor]):
        return WeightedAverage()

    def step(self, global_state: dict[str, torch.Tensor], acc) -> dict[str, torch.Tensor]:
        return acc.result(global_state)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FedAvg(Strategy):
    """McMahan et al. 2017: the sample-weighted average (fed.weighting picks total or per-modality weights)."""


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg on the server; the clients add mu/2 ||w - w_global||^2 (fed.prox_mu) to their loss."""


class FedAvgM(Strategy):
    """Hsu et al. 2019: server momentum on the pseudo-gradient d = w_global - average: v <- beta v + d,
    w <- w_global - server_lr v. Applied to the model's parameters; buffers (BatchNorm statistics) take the
    plain average, as they are statistics, not weights being optimised. With beta = 0 and server_lr = 1 the
    average is returned as it is, so it equals FedAvg bit for bit (w - (w - a) would round)."""

    def __init__(self, fed, param_keys=()):
        super().__init__(fed, param_keys)
        self.beta, self.lr = fed.server_momentum, fed.server_lr
        self.v: dict[str, torch.Tensor] = {}

    def step(self, global_state, acc):
        avg = acc.result(global_state)
        if self.beta == 0 and self.lr == 1:
            return avg
        out = dict(avg)
        for k, a in avg.items():
            if k not in self.param_keys or not a.is_floating_point():
                continue
            g = global_state[k].double()
            d = g - a.double()
            v = self.v.get(k)
            v = d if v is None else self.beta * v.to(d.device).double() + d
            self.v[k] = v.float()
            out[k] = (g - self.lr * self.v[k].double()).to(a.dtype)
        return out

    def state_dict(self):
        return {"v": {k: v.cpu() for k, v in self.v.items()}}

    def load_state_dict(self, state):
        self.v = {k: v.clone() for k, v in state.get("v", {}).items()}


class LDAWA(Strategy):
    """Layer-wise divergence-aware aggregation (the authors' L-DAWA; see LayerCosineAverage for the choices)."""

    def accumulator(self, global_state):
        return LayerCosineAverage(global_state)


class Median(Strategy):
    """Coordinate-wise median (Yin et al. 2018): robust to a minority of broken or hostile clients."""

    def accumulator(self, global_state):
        return CoordinateRobust("median")


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean, cutting fed.trim_frac at each end (Yin et al. 2018)."""

    def accumulator(self, global_state):
        return CoordinateRobust("trimmed_mean", self.fed.trim_frac)


STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "ldawa": LDAWA, "median": Median,
              "trimmed_mean": TrimmedMean}


def make_strategy(fed: "FedConfig", param_keys=()) -> Strategy:
    return STRATEGIES[fed.aggregation](fed, param_keys)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (weights = local sample counts)."""
    agg = WeightedAverage()
    for s, w in zip(states, weights):
        agg.add(s, w)
    return agg.result(states[0])


def modality_weight(samples: dict[str, int]) -> Callable[[str], float]:
    """Per-key FedAvg weight for a client with `samples` local samples per modality: a key that belongs
    to one modality (its stem, head or BN statistics) counts that modality's samples, so a client that
    never touched it (returning the global copy unchanged) does not dilute the average; shared keys
    count all samples."""
    total = sum(samples.values())
    return lambda k: samples.get(key_modality(k), 0) if key_modality(k) else total


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    flags = [torch.isfinite(v).all() for v in state.values() if v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass
class ClientUpdate:
    client: int
    state: dict[str, torch.Tensor]   # the client's weights after local training (may be live model tensors)
    samples: dict[str, int]          # local samples per modality
    metrics: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(self.samples.values())


def nbytes(state: dict[str, torch.Tensor], keys=None) -> int:
    """Bytes of the tensors of `state` (those named in `keys`, default all): what travels on the wire."""
    return sum(v.numel() * v.element_size() for k, v in state.items() if keys is None or k in keys)


def run_round(global_state: dict[str, torch.Tensor], clients: list[int],
              local_update: Callable[[int], ClientUpdate], share: Callable[[str], bool] = is_shared,
              on_client: Optional[Callable[[ClientUpdate], None]] = None, weighting: str = "total",
              aggregator=None, strategy: Optional[Strategy] = None):
    """One round. Each client's update is consumed before the next client trains, so `local_update`
    may return views of one reused model. Updates with a non-finite loss or weight are rejected and
    logged; if all are rejected the global model is kept. weighting: 'total' weights every key by the
    client's sample count; 'modality' uses `modality_weight`. strategy: the server Strategy (its accumulator
    folds the clients, its step makes the new global tensors); or aggregator: a bare accumulator (FedAvg's
    WeightedAverage by default).
    Each accepted client's metrics carry `bytes_down` (the shared global tensors the server sent it) and
    `bytes_up` (the tensors of its reply that the server aggregates: a key with weight 0 for this client,
    such as the other modality's stem under weighting='modality', is not counted, as it need not be sent).
    Returns (new_global_state, list of per-client metric dicts, list of rejected client ids)."""
    agg = aggregator or (strategy.accumulator(global_state) if strategy is not None else WeightedAverage())
    metrics, rejected = [], []
    down = nbytes(global_state, {k for k in global_state if share(k)})
    for cid in clients:
        upd = local_update(cid)
        shared = {k: v for k, v in upd.state.items() if share(k)}
        loss_ok = all(math.isfinite(v) for k, v in upd.metrics.items() if k.startswith("loss"))
        if not (loss_ok and all_finite(shared)):
            rejected.append(cid)
            continue
        if on_client is not None:
            on_client(upd)
        weight = modality_weight(upd.samples) if weighting == "modality" else upd.num_samples
        agg.add(shared, weight)
        sent = [k for k in shared if (weight(k) if callable(weight) else weight) > 0]
        metrics.append({"client": cid, "n": upd.num_samples, **upd.metrics, "bytes_down": down,
                        "bytes_up": nbytes(shared, set(sent))})
    if not metrics:
        return dict(global_state), metrics, rejected
    new = dict(global_state)
    new.update(strategy.step(global_state, agg) if strategy is not None and aggregator is None else agg.result(global_state))
    return new, metrics, rejected


# ----------------------------------------------------------------------------- the local SSL update

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
    slots = sorted(((i + 0.5) / n, m) for m, n in nb.items() for i in range(n))
    return [(m,) for _, m in slots]


def _batches(n: int, batch_size: int, g: torch.Generator, device) -> list[torch.Tensor]:
    """A shuffled epoch of index batches; the last partial batch is dropped unless it is the only one."""
    perm = torch.randperm(n, generator=g, device=device)
    if n <= batch_size:
        return [perm]
    return list(perm[: n // batch_size * batch_size].split(batch_size))


class Interrupted(Exception):
    """Raised between local steps when a stop was requested (SIGINT/SIGTERM)."""


def local_ssl_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, data: dict[str, ModalityData],
                     indices: dict[str, torch.Tensor], data_cfg: DataConfig, fed_cfg: FedConfig, optim_cfg: OptimConfig,
                     tau: float, lr: float, g: torch.Generator, amp: str = "fp32",
                     should_stop: Optional[Callable[[], bool]] = None, max_steps: int = 0) -> dict:
    """E local epochs of SimCLR on one client's unlabelled data, in place on `model`. Both views of a
    batch are made on the device by `augment` with per-sample parameters from generator `g`.
    Returns loss means per modality (a non-finite mean marks the update for rejection) and step count.
    `should_stop` is polled after every step; when it returns True the step finishes and Interrupted
    is raised. max_steps > 0 stops after that many steps (dry runs)."""
    device = next(model.parameters()).device
    model.train()
    reset_bn_stats(model, tuple(indices))  # cumulative BN statistics describe this client's round
    optimizer.state.clear()  # FedAvg: local optimizer state starts fresh on every client
    for group in optimizer.param_groups:
        group["lr"] = lr
    sizes = {m: len(indices[m]) for m in indices}
    loss_sum = {m: torch.zeros((), device=device) for m in indices}
    loss_cnt = {m: 0 for m in indices}
    fwd = {m: 0 for m in indices}  # samples forwarded (both views), for the measured forward FLOPs
    # FedProx: the weights this client started from (the global model); mu = 0 adds nothing at all
    anchor = [p.detach().clone() for p in model.parameters()] if fed_cfg.prox_mu > 0 else None
    steps = 0
    for _ in range(fed_cfg.local_epochs):
        bs = {m: optim_cfg.batch_for(m) for m in indices}
        schedule = batch_schedule(sizes, bs, fed_cfg.order)
        if max_steps:
            schedule = schedule[:max(0, max_steps - steps)]
        queues = {m: [] for m in indices}
        for mods in schedule:
            embeds = {}
            for m in mods:
                if not queues[m]:
                    queues[m] = _batches(sizes[m], bs[m], g, device)
                x = data[m].train_x[indices[m][queues[m].pop(0)]]
                # views in fp32 outside autocast (blur and colour maths in bf16 would quantise them)
                v = torch.cat([augment(m, x, data[m], data_cfg, g), augment(m, x, data[m], data_cfg, g)])
                with autocast(device, amp):
                    z = model(v, m)  # (2B, D): both views in one pass
                fwd[m] += len(z)
                embeds[m] = z.chunk(2)
            if fed_cfg.cross_modal_negatives and len(mods) > 1:
                z1 = torch.cat([embeds[m][0] for m in mods])
                z2 = torch.cat([embeds[m][1] for m in mods])
                rows = nt_xent(z1, z2, tau, reduction="none")
                sizes_b = [len(embeds[m][0]) for m in mods]
                per_mod = {}
                for half in rows.chunk(2):
                    for m, part in zip(mods, half.split(sizes_b)):
                        per_mod.setdefault(m, []).append(part)
                # each modality's rows averaged, then summed: the same scale as the default loss, so the
                # cross-modal-negatives ablation changes the negatives only, not the gradient's size
                losses = {m: torch.cat(p).mean() for m, p in per_mod.items()}
            else:
                losses = {m: nt_xent(*embeds[m], tau) for m in mods}
            loss = sum(losses.values())
            if anchor is not None:  # mu/2 ||w - w_global||^2, in fp32 outside autocast
                loss = loss + fed_cfg.prox_mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in zip(model.parameters(), anchor))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if optim_cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
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
