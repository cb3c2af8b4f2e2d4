"""Federated rounds as pure functions over state dicts: the federation config, client sampling, what is shared,
the per-key FedAvg weights, and one round (`run_round`): each sampled client's update is folded by the run's
strategy (strategies.py) as it arrives, non-finite updates are rejected, and what moved is counted. Local training
comes in as a callable (`local_update(client_id) -> ClientUpdate`), so the round logic is tested with a dummy
update; the real one is local_update.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from models import key_modality
from runtime import derive_seed
from settings import ConfigError, check_choice, check_range, to_dict
from strategies import STRATEGIES, Strategy, WeightedAverage


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
    modality_fractions: tuple[float, ...] = (0.4, 0.4, 0.2)  # share of clients per holding kind: image only, audio only, both
    federation: str = "joint"           # joint: clients hold modalities by modality_fractions even in a one-modality run, so
                                        # the image-only / audio-only baselines train on FSSUAVL's exact clients and rounds
                                        # (a sampled client without the modality sits the round out); single: with one
                                        # modality, every client holds it (a plain single-modality federation)
    order: str = "alternate"            # alternate: one step per single-modality batch; sum: one step on L_img + L_aud
    cross_modal_negatives: bool = False  # with order=sum: the other modality's embeddings are extra negatives
    share_head: bool = True             # the server averages the projection head (else it stays on each client)
    weighting: str = "modality"         # modality: a modality's own keys (stem, head, BN stats) are weighted by that
                                        # modality's local samples; total: every key by all local samples (plain FedAvg)
    aggregation: str = "fedavg"         # server strategy, a key of strategies.STRATEGIES: fedavg | fedprox | fedavgm | ldawa |
                                        # median | trimmed_mean (docs/strategies.md)
    strategy: dict[str, Any] = field(default_factory=dict)  # the strategy's own hyperparameters (its Params in
                                        # strategies.py), e.g. {server_momentum: 0.9} for fedavgm; written out in full,
                                        # defaults included, once checked
    budget_of: str = ""                 # the centralised bound: one client holding all the data trains, in each round,
                                        # exactly the batches (count and size per modality) that the federation of this
                                        # config (a path, or a name in configs/) trains in that round with this seed;
                                        # "" = off. configs/centralised.yaml

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
        strategy = STRATEGIES[self.aggregation]
        params = strategy.params_of(self)
        strategy.check(self, params)
        self.strategy = to_dict(params)
        if not self.modality_fractions or min(self.modality_fractions) < 0 or sum(self.modality_fractions) <= 0:
            raise ConfigError(f"fed.modality_fractions={list(self.modality_fractions)}: expected non-negative fractions "
                              f"with a positive sum, one per holding kind (two modalities: image only, audio only, both)")
        if self.budget_of and (self.clients != 1 or self.order != "alternate"):
            raise ConfigError(f"fed.budget_of={self.budget_of} trains one client that holds all the data, one modality a "
                              f"step: it needs fed.clients=1 and fed.order=alternate (got {self.clients} and {self.order})")
        if self.cross_modal_negatives and self.order != "sum":
            raise ConfigError("fed.cross_modal_negatives=true needs fed.order=sum (both modalities in one step)")

    @staticmethod
    def upgrade(data: dict) -> dict:
        """A `fed` section written before the strategies' hyperparameters moved under `fed.strategy` (checkpoints,
        run directories, older YAML): fed.prox_mu, fed.server_momentum, fed.server_lr and fed.trim_frac move there
        when the strategy reads them; every old config wrote all four, so one the strategy does not read is dropped
        at its old default and refused otherwise."""
        old = {k: data.pop(k) for k in _MOVED_TO_STRATEGY if k in data}
        if not old:
            return data
        agg = data.get("aggregation", "fedavg")
        reads = STRATEGIES[agg].Params.__dataclass_fields__ if agg in STRATEGIES else {}
        strategy = dict(data.get("strategy") or {})
        for k, v in old.items():
            if k in reads:
                strategy.setdefault(k, v)
            elif v != _MOVED_TO_STRATEGY[k]:
                owner = next(n for n, c in STRATEGIES.items() if k in c.Params.__dataclass_fields__)
                raise ConfigError(f"fed.{k}={v} acts only under fed.aggregation={owner} (now fed.strategy.{k}), but "
                                  f"fed.aggregation={agg}: set fed.aggregation={owner}, or drop fed.{k}")
        data["strategy"] = strategy
        return data


# keys of FedConfig before they moved to fed.strategy, with their old defaults (FedConfig.upgrade)
_MOVED_TO_STRATEGY = {"prox_mu": 0.0, "server_momentum": 0.9, "server_lr": 1.0, "trim_frac": 0.1}


def sample_clients(eligible: list[int], k: int, seed: int, round_idx: int) -> list[int]:
    """K distinct clients for a round, a pure function of (seed, round): resume needs no sampler state."""
    rng = np.random.default_rng(derive_seed(seed, "sample", round_idx))
    return sorted(int(c) for c in rng.choice(np.asarray(eligible), size=min(k, len(eligible)), replace=False))


def is_shared(name: str, share_head: bool = True) -> bool:
    """What the server aggregates: everything, except the projection head(s) when share_head=False."""
    return share_head or not name.startswith("heads.")


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
              local_update: Callable[[int], ClientUpdate], *, share: Callable[[str], bool] = is_shared,
              on_client: Optional[Callable[[ClientUpdate], None]] = None, weighting: str = "total",
              strategy: Optional[Strategy] = None):
    """One round. Each client's update is consumed before the next client trains, so `local_update`
    may return views of one reused model. Updates with a non-finite loss or weight are rejected and
    logged; if all are rejected the global model is kept. weighting: 'total' weights every key by the
    client's sample count; 'modality' uses `modality_weight`. strategy: the server Strategy (its accumulator
    folds the clients, its step makes the new global tensors); None is plain FedAvg.
    Each accepted client's metrics carry `bytes_down` (the shared global tensors the server sent it) and
    `bytes_up` (the tensors of its reply that the server aggregates: a key with weight 0 for this client,
    such as the other modality's stem under weighting='modality', is not counted, as it need not be sent).
    Returns (new_global_state, list of per-client metric dicts, list of rejected client ids)."""
    agg = strategy.accumulator(global_state) if strategy is not None else WeightedAverage()
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
    new.update(strategy.step(global_state, agg) if strategy is not None else agg.result(global_state))
    return new, metrics, rejected


