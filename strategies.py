"""Server strategies, in the spirit of Flower's strategies: how the server folds the clients' states into the new
global model (FedAvg, FedProx, FedAvgM, L-DAWA, coordinate-wise median and trimmed mean), each one small class
behind one STRATEGIES key, with the state it keeps across rounds (saved in last.pt, so resume stays exact) and,
where the method has one, the client-side hook it adds to local training (FedProx's proximal term).
A strategy's own hyperparameters live with it, as its `Params` dataclass, set under `fed.strategy` in a config
(`--fed.strategy.server_momentum=0.9`); a key the chosen strategy does not read is refused, naming the ones it does.
A new strategy is one subclass (with its Params, if it has any) and one STRATEGIES entry, in this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from settings import ConfigError, build_dataclass, check_range

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
        self.warned = False

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
            else:  # fewer clients than K (some sat out) can leave nothing to cut: said once per round
                cut = int(self.trim_frac * len(vs))
                if cut == 0 and not self.warned:
                    self.warned = True
                    print(f"warning: trimmed mean over {len(vs)} clients with trim_frac={self.trim_frac} cuts nothing "
                          f"this round (the plain mean)")
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
    last.pt, so --resume stays bit-identical. Its hyperparameters are its `Params` dataclass (none here), built
    from the config's `fed.strategy` mapping by `params_of`. A new strategy is one subclass and one STRATEGIES
    entry."""

    @dataclass
    class Params:
        pass

    def __init__(self, fed, param_keys=()):
        self.fed, self.param_keys = fed, set(param_keys)
        self.params = self.params_of(fed)

    @classmethod
    def params_of(cls, fed) -> "Strategy.Params":
        """This strategy's hyperparameters from `fed.strategy`, checked: an unknown key names the known ones."""
        known = [f for f in cls.Params.__dataclass_fields__]
        unknown = sorted(set(fed.strategy) - set(known))
        if unknown:
            owner = next((n for n, c in STRATEGIES.items() if unknown[0] in c.Params.__dataclass_fields__), None)
            raise ConfigError(f"fed.strategy.{unknown[0]} is not a hyperparameter of fed.aggregation={fed.aggregation} "
                              + (f"(it takes {', '.join(known)})" if known else "(it takes none)")
                              + (f"; it belongs to fed.aggregation={owner}" if owner else ""))
        return build_dataclass(cls.Params, dict(fed.strategy), "fed.strategy.")

    @classmethod
    def check(cls, fed, params) -> None:
        """Checks that need the rest of the federation's config (the number of clients a round, ...)."""

    @classmethod
    def likely_cause(cls, params, peak_lr: float) -> Optional[str]:
        """The hyperparameter of this strategy most likely behind a run that blew up, or None."""
        return None

    def accumulator(self, global_state: dict[str, torch.Tensor]):
        return WeightedAverage()

    def step(self, global_state: dict[str, torch.Tensor], acc) -> dict[str, torch.Tensor]:
        return acc.result(global_state)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def client_hook(cls, fed) -> Optional["ProximalTerm"]:
        """What this strategy adds to every client's local training (None: nothing). A classmethod, so a client
        process builds it from the config alone, without the server's state."""
        return None


class ProximalTerm:
    """FedProx's client-side hook: mu/2 ||w - w_global||^2 added to each local step's loss, w_global being the
    weights the client started the round from. Computed in fp32 outside autocast."""

    def __init__(self, mu: float):
        self.mu = mu
        self.anchor: list[torch.Tensor] = []

    def start(self, model: torch.nn.Module) -> None:
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        return self.mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in zip(model.parameters(), self.anchor))


class FedAvg(Strategy):
    """McMahan et al. 2017: the sample-weighted average (fed.weighting picks total or per-modality weights)."""


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg on the server; the clients add mu/2 ||w - w_global||^2 (fed.strategy.prox_mu) to
    their loss."""

    @dataclass
    class Params:
        prox_mu: float = 0.01           # mu of the proximal term (0 would be plain FedAvg: refused)

        def __post_init__(self):
            check_range("fed.strategy.prox_mu", self.prox_mu, lo=0.0, lo_open=True, hi=1e4)

    @classmethod
    def client_hook(cls, fed) -> "ProximalTerm":
        return ProximalTerm(cls.params_of(fed).prox_mu)

    @classmethod
    def likely_cause(cls, params, peak_lr):
        if params.prox_mu * peak_lr >= 1:
            return (f"FedProx's term: lower fed.strategy.prox_mu ({params.prox_mu:g}; mu x lr >= 1 overshoots the "
                    f"global weights)")
        return None


class FedAvgM(Strategy):
    """Hsu et al. 2019: server momentum on the pseudo-gradient d = w_global - average: v <- beta v + d,
    w <- w_global - server_lr v. Applied to the model's parameters; buffers (BatchNorm statistics) take the
    plain average, as they are statistics, not weights being optimised. With beta = 0 and server_lr = 1 the
    average is returned as it is, so it equals FedAvg bit for bit (w - (w - a) would round)."""

    @dataclass
    class Params:
        server_momentum: float = 0.9    # beta of the server momentum on the pseudo-gradient
        server_lr: float = 1.0          # the server's learning rate (its effective step is server_lr / (1 - beta))

        def __post_init__(self):
            check_range("fed.strategy.server_momentum", self.server_momentum, lo=0.0, hi=0.999)
            check_range("fed.strategy.server_lr", self.server_lr, lo=0.0, lo_open=True, hi=10.0)

    def __init__(self, fed, param_keys=()):
        super().__init__(fed, param_keys)
        self.beta, self.lr = self.params.server_momentum, self.params.server_lr
        self.v: dict[str, torch.Tensor] = {}

    @classmethod
    def likely_cause(cls, params, peak_lr):
        if params.server_lr > 1 or params.server_momentum > 0.95:
            return (f"the server step: lower fed.strategy.server_lr ({params.server_lr:g}) or "
                    f"fed.strategy.server_momentum ({params.server_momentum:g})")
        return None

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
    """Coordinate-wise trimmed mean, cutting fed.strategy.trim_frac at each end (Yin et al. 2018)."""

    @dataclass
    class Params:
        trim_frac: float = 0.1          # fraction cut from each end per coordinate

        def __post_init__(self):
            check_range("fed.strategy.trim_frac", self.trim_frac, lo=0.0, hi=0.49)

    @classmethod
    def check(cls, fed, params):
        frac, k = params.trim_frac, fed.clients_per_round
        if int(frac * k) < 1:
            need = 1 / k  # the smallest trim_frac that cuts one client per end
            raise ConfigError(f"fed.aggregation=trimmed_mean with fed.strategy.trim_frac={frac} and "
                              f"fed.clients_per_round={k} trims nothing (it cuts int(trim_frac x K) = 0 clients per "
                              f"end, the plain mean): "
                              + (f"raise fed.strategy.trim_frac to at least {need:.3g}, " if need <= 0.49 else "")
                              + (f"raise fed.clients_per_round to at least {math.ceil(1 / frac):d}, " if frac > 0 else "")
                              + "or use fed.aggregation=median")

    def accumulator(self, global_state):
        return CoordinateRobust("trimmed_mean", self.params.trim_frac)


STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "ldawa": LDAWA, "median": Median,
              "trimmed_mean": TrimmedMean}


def make_strategy(fed, param_keys=()) -> Strategy:
    return STRATEGIES[fed.aggregation](fed, param_keys)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (weights = local sample counts)."""
    agg = WeightedAverage()
    for s, w in zip(states, weights):
        agg.add(s, w)
    return agg.result(states[0])


