"""The federation machinery every engine shares: the pretraining config, the client runtime (`Clients`: one
process's data, partition, model and optimiser, and the client function `update`), the server's sampling and fold
(`plan_round`, `server_round`), the engine interface (`Engine`) and the reference engine (`InProcess`). The
torchrun engine (fedengines/torchrun.py) and the Flower engine (fedengines/flower_app.py) implement the same interface around the
same two functions, so on the same seed every engine gives the same global weights.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from tqdm import tqdm

import runtime
from catalog import check_dataset_name, dataset_modalities, load_data
from data import DataConfig
from federation import ClientUpdate, FedConfig, is_shared, run_round, sample_clients
from local_update import LocalSettings, OptimConfig, batch_schedule, local_ssl_update, lr_at, make_optimizer, \
    stream_batches
from losses import OBJECTIVES, LossConfig
from modality_specs import MODALITIES
from models import ModelConfig, backbone_family, build_model
from partition import holding_kinds, partition
from settings import ConfigError, RunConfig, UserError, dict_diff, expand_path, load_config, to_dict
from strategies import STRATEGIES

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        check_dataset_name(self.data.dataset)
        missing = set(self.data.modalities) - set(dataset_modalities(self.data.dataset))
        if missing:
            raise ConfigError(f"data.modalities={list(self.data.modalities)}: data.dataset={self.data.dataset} has no "
                              f"{', '.join(sorted(missing))} (it yields {', '.join(dataset_modalities(self.data.dataset))})")
        if self.optim.warmup_rounds >= self.fed.rounds:
            raise ConfigError(f"optim.warmup_rounds={self.optim.warmup_rounds} must be below fed.rounds={self.fed.rounds} "
                              f"(the learning rate would never reach its peak)")
        if self.fed.cross_modal_negatives and not OBJECTIVES[self.loss.name].cross_modal_negatives:
            raise ConfigError(f"fed.cross_modal_negatives=true means nothing to loss.name={self.loss.name} (it has no "
                              f"negatives): use loss.name=nt_xent, or drop fed.cross_modal_negatives")
        if not self.optim.reset_state and self.fed.clients != 1:
            raise ConfigError(f"optim.reset_state=false carries one optimiser's momentum from client to client: it is "
                              f"meant for one client (the centralised bound), not fed.clients={self.fed.clients}")
        if self.fed.order == "sum" and len(self.data.modalities) < 2 and self.fed.cross_modal_negatives:
            raise ConfigError("fed.cross_modal_negatives=true needs at least two data.modalities")
        mods = self.federation_modalities
        if len(mods) > 1:
            kinds = holding_kinds(mods)
            fr = self.fed.modality_fractions
            if len(fr) != len(kinds):
                raise ConfigError(f"fed.modality_fractions={list(fr)}: expected {len(kinds)} fractions, one per "
                                  f"holding kind ({', '.join('+'.join(k) for k in kinds)})")
            for m in self.data.modalities:
                if sum(f for f, k in zip(fr, kinds) if m in k) <= 0:
                    raise ConfigError(f"fed.modality_fractions={list(fr)} gives no client {m} data although "
                                      f"data.modalities includes {m}: give a kind holding {m} a positive fraction")

    @property
    def federation_modalities(self) -> tuple[str, ...]:
        """The modalities the clients hold: all the dataset yields in a joint federation (a one-modality run is then
        a baseline on FSSUAVL's clients), else the trained ones. In registry order."""
        held = dataset_modalities(self.data.dataset) if self.fed.federation == "joint" else self.data.modalities
        return tuple(m for m in MODALITIES if m in held)


def make_clients(cfg: PretrainConfig, data) -> list[dict]:
    """The run's partition: client k's {modality: training indices}, a pure function of the config."""
    return partition(data, cfg.fed.clients, cfg.fed.partition, cfg.fed.alpha, cfg.fed.modality_fractions,
                     seed=runtime.derive_seed(cfg.run.seed, "partition"), min_size=cfg.fed.min_client_size,
                     classes_per_client=cfg.fed.classes_per_client, federation=cfg.federation_modalities)


def check_clients(cfg: PretrainConfig, clients: list[dict]) -> None:
    """Impossible federations, found once the data are partitioned."""
    for m in cfg.data.modalities:
        sizes = [len(c[m]) for c in clients if m in c]
        if not sizes:
            raise ConfigError(f"fed.modality_fractions={list(cfg.fed.modality_fractions)}: no client holds {m}")
        bs = cfg.optim.batch_for(m)
        if max(sizes) < bs:
            key = "optim.batch_size_audio" if bs != cfg.optim.batch_size else "optim.batch_size"
            raise ConfigError(f"{key}={bs} is larger than every client's {m} data "
                              f"(the largest client holds {max(sizes)}): lower {key} or fed.clients")


def budget_config(name: str) -> Path:
    """fed.budget_of's file: a path, or a name in configs/."""
    for p in (Path(expand_path(name, "fed.budget_of")), CONFIG_DIR / name):
        if p.is_file():
            return p
    raise ConfigError(f"fed.budget_of={name}: no such config (as a path, or in {CONFIG_DIR})")


def matched_budget(cfg: PretrainConfig, data: dict) -> list[dict[str, list[int]]]:
    """fed.budget_of: for each round r = 1..R, the sizes of the local batches per modality that the federation of that
    config trains (its partition and sampled clients, this run's seed and modalities), in step order: what
    the one client of a centralised run trains instead, so both take the same steps and samples of each modality (at
    the same learning rate in every round when both have the same fed.rounds)."""
    mods = json.dumps(list(cfg.data.modalities))
    ref = load_config(PretrainConfig, budget_config(cfg.fed.budget_of),
                      [f"--run.seed={cfg.run.seed}", f"--data.modalities={mods}"])
    if ref.fed.budget_of:
        raise ConfigError(f"fed.budget_of={cfg.fed.budget_of} is itself a centralised run: name the federation whose "
                          f"budget to match")
    differ = dict_diff(to_dict(ref.data), to_dict(cfg.data)) + [
        f"optim.{k}" for k in dict_diff(to_dict(ref.optim), to_dict(cfg.optim)) if not k.startswith("reset_state")]
    if differ:
        raise ConfigError(f"fed.budget_of={cfg.fed.budget_of}: a centralised bound must see the same data and optimiser "
                          f"as the federation it matches, but {', '.join(differ)} differ")
    parts = make_clients(ref, data)
    bs = {m: ref.optim.batch_for(m) for m in cfg.data.modalities}
    out = []
    for r in range(1, cfg.fed.rounds + 1):
        _, active = plan_round(r, ref, lambda c: bool(parts[c]))
        sizes = {m: [] for m in cfg.data.modalities}
        for c in active:
            held = {m: len(v) for m, v in parts[c].items()}
            steps = [m for _ in range(ref.fed.local_epochs) for step in batch_schedule(held, bs, ref.fed.order)
                     for m in step]
            for m in steps:
                sizes[m].append(min(bs[m], held[m]))  # a client smaller than a batch trains on all it holds
        out.append(sizes)
    return out


class Clients:
    """The client side of every engine: one process's means to train any client of the federation. It holds
    the data (on its device), the partition, and one model, optimiser and scaler reused by every client it
    trains. `update` is the client function: (global state, client id, round) -> ClientUpdate, whose randomness
    comes only from (seed, round, client), so any process that holds the same data computes the same update
    (the in-process loop, a torchrun rank and a Flower ClientApp all call it)."""

    def __init__(self, cfg: PretrainConfig, device, progress: bool = False, data: dict | None = None,
                 parts: list | None = None, shapes: dict | None = None):
        """data: {modality: ModalityData} (default: the config's dataset, loaded); parts: the clients' training
        indices (default: the config's partition of data); shapes: the model's inputs (default: data's)."""
        self.cfg, self.device = cfg, device
        self.data = data if data is not None else load_data(cfg.data, device, progress=progress)
        if parts is None:
            parts = make_clients(cfg, self.data)
            check_clients(cfg, parts)
        self.parts = parts  # numpy indices, for --show-partition and dry runs
        self.clients = [{m: torch.as_tensor(v, device=device) for m, v in c.items()} for c in parts]
        self.input_shapes = shapes or {m: md.shape for m, md in self.data.items()}
        self.model = build_model(cfg.model, self.input_shapes).to(device)
        self.model = self.model.to(memory_format=backbone_family(cfg.model.arch).memory_format)
        if cfg.run.compile:  # in place, so state_dict keys stay free of torch.compile's _orig_mod. prefix
            self.model.trunk.compile()
        self.optimizer = make_optimizer(self.model, cfg.optim)
        # fp16's loss scale is the one state that outlives a client: it carries over the clients a process trains
        self.scaler = runtime.make_scaler(device, cfg.run.amp)
        self.settings = LocalSettings.of(cfg, STRATEGIES[cfg.fed.aggregation].client_hook(cfg.fed))
        # the centralised bound: each round's batch sizes, and where each modality's stream of epochs stands then
        self.budget = matched_budget(cfg, self.data) if cfg.fed.budget_of else None
        self.stream_at, at = [], {m: 0 for m in self.data}  # the samples of each stream taken before each round
        for sizes in self.budget or []:
            self.stream_at.append(dict(at))
            at = {m: at[m] + sum(sizes[m]) for m in at}
        self.resident = all(md.residency == "device" for md in self.data.values())
        self.upcoming: list[int] = []   # host/disk tiers: the clients this process trains next, in order
        self._prefetch = None           # (cid, future of its gathered samples)
        self._pool = None

    def client_data(self, cid: int) -> tuple[dict, dict]:
        """({modality: ModalityData}, {modality: indices}) client `cid` trains on. Device tier: the whole data and
        the client's indices. Host and disk tiers: the client's samples gathered onto the device (from the
        prefetch when it was started) and indices 0..n-1, the very rows and batches of the device tier; on CUDA the next
        client of `upcoming` is then gathered in the background while this one trains."""
        held = {m: self.clients[cid][m] for m in self.data if m in self.clients[cid]}
        if self.resident:
            return self.data, held
        if self._prefetch is not None and self._prefetch[0] == cid:
            views = self._prefetch[1].result()
        else:
            views = self._gather(cid)
        self._prefetch = None
        # on a CUDA device the next client's gather overlaps this one's training; on a CPU device it would only
        # compete with training for the same cores (a second OpenMP team spinning beside it)
        if cid in self.upcoming and torch.device(self.device).type == "cuda":
            rest = self.upcoming[self.upcoming.index(cid) + 1:]
            if rest:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
                self._prefetch = (rest[0], self._pool.submit(self._gather, rest[0], True))
        views = {m: v.on_device(self.device) for m, v in views.items()}
        return views, {m: torch.arange(len(v), device=self.device) for m, v in held.items()}

    def _gather(self, cid: int, background: bool = False) -> dict:
        pin = background and torch.device(self.device).type == "cuda"
        return {m: self.data[m].client_view(self.clients[cid][m], self.device, pin=pin)
                for m in self.data if m in self.clients[cid]}

    def holds(self, cid: int) -> bool:
        return bool(self.clients[cid])

    @property
    def train_samples(self) -> dict[str, int]:
        return {m: len(md.train_x) for m, md in self.data.items()}

    @property
    def modalities(self) -> tuple[str, ...]:
        """The trained modalities, in the order the round's log records them."""
        return tuple(self.data)

    def input_stats(self) -> dict:
        """The normalising statistics pretraining used (kept in last.pt, so fine-tuning normalises alike)."""
        return {m: {"mean": md.mean.tolist(), "std": md.std.tolist()} for m, md in self.data.items()}

    def share(self, key: str) -> bool:
        return is_shared(key, self.cfg.fed.share_head)

    def update(self, global_state: dict, cid: int, r: int, private: dict | None = None,
               should_stop=None, draw_as: int | None = None) -> ClientUpdate:
        """Client `cid`'s local epochs of round `r` from `global_state` (plus its own unshared tensors,
        `private`), its randomness drawn as client `draw_as` (default cid; a SuperNode with its own data trains
        its slot 0 as the client id the server gave it). The returned state holds live model tensors: consume
        them before the next update."""
        cfg = self.cfg
        state = dict(global_state)
        state.update(private or {})
        self.model.load_state_dict(state)
        g = runtime.make_generator(self.device, cfg.run.seed, "client", r, cid if draw_as is None else draw_as)
        data, idx = self.client_data(cid)
        batches = None
        if self.budget is not None:
            batches = {m: stream_batches(len(idx[m]), self.budget[r - 1][m], self.stream_at[r - 1][m], cfg.run.seed, m,
                                         self.device) for m in idx}
        metrics = local_ssl_update(self.model, self.optimizer, self.scaler, data, idx, self.settings,
                                   lr_at(r, cfg.optim, cfg.fed.rounds), g, should_stop, batches=batches)
        return ClientUpdate(cid, self.model.state_dict(), {m: len(v) for m, v in idx.items()}, metrics)


def plan_round(r: int, cfg: PretrainConfig, holds) -> tuple[list[int], list[int]]:
    """The server's sampling: K of the N clients, a pure function of (seed, round), and those of them that
    hold a trained modality (the others sit the round out)."""
    sampled = sample_clients(list(range(cfg.fed.clients)), cfg.fed.clients_per_round, cfg.run.seed, r)
    return sampled, [c for c in sampled if holds(c)]


def round_record(r: int, cfg: PretrainConfig, sampled, active, per_client, modalities, flops) -> dict:
    """The round's log record: what moved (bytes up/down per client) and what ran (steps, samples, forward FLOPs)."""
    out = {"round": r, "clients": sampled, "lr": lr_at(r, cfg.optim, cfg.fed.rounds)}
    if len(active) < len(sampled):
        out["sat_out"] = [c for c in sampled if c not in active]
    for m in modalities:
        vals = [c[f"loss_{m}"] for c in per_client if f"loss_{m}" in c]
        if vals:
            out[f"loss_{m}"] = sum(vals) / len(vals)
    out["steps"] = sum(c["steps"] for c in per_client)
    for m in modalities:
        out[f"samples_{m}"] = sum(c.get(f"fwd_{m}", 0) for c in per_client) // 2  # instances (two views each)
    out["fwd_flops"] = sum(c.get(f"fwd_{m}", 0) * (flops or {}).get(m, 0) for c in per_client for m in modalities)
    times = [c for c in per_client if "t_train" in c]  # a Flower ClientApp's start, data and training seconds
    if times:
        out["clientapp_s"] = {k: round(sum(c[f"t_{k}"] for c in times) / len(times), 3) for k in ("start", "data", "train")}
    out["bytes_up"] = sum(c["bytes_up"] for c in per_client)
    out["bytes_down"] = sum(c["bytes_down"] for c in per_client)
    out["per_client"] = [{"client": c["client"], "steps": c["steps"], "bytes_up": c["bytes_up"],
                          "bytes_down": c["bytes_down"], **{f"samples_{m}": c.get(f"fwd_{m}", 0) // 2 for m in modalities}}
                         for c in per_client]
    return out


def server_round(r: int, cfg: PretrainConfig, global_state, client_state, strategy, sampled, active, fetch,
                 modalities, flops: dict | None = None) -> tuple[dict, dict]:
    """The server function: fold the updates of `active` (fetch(cid) -> ClientUpdate, called in client order,
    so every engine folds in the same order and gets the same bits) with `strategy` (one object for the whole
    run: it may keep server state across rounds). Unshared tensors go to `client_state`. Returns the new global
    state and the round's log record."""
    share = lambda k: is_shared(k, cfg.fed.share_head)  # noqa: E731

    def keep_local(upd: ClientUpdate):
        local = {k: v.detach().clone() for k, v in upd.state.items() if not share(k)}
        if local:
            client_state[upd.client] = local

    new_state, per_client, rejected = run_round(global_state, active, fetch, share=share, on_client=keep_local,
                                                weighting=cfg.fed.weighting, strategy=strategy)
    out = round_record(r, cfg, sampled, active, per_client, modalities, flops)
    if rejected:
        out["rejected"] = rejected
        tqdm.write(f"round {r}: rejected non-finite updates from clients {rejected}"
                   + (" (all: global model kept)" if not per_client else ""))
    return new_state, out


class LostWorker(UserError):
    """A process of the engine (a torchrun rank, a Flower node) went away mid-round; the round is not saved."""


class Engine(Protocol):
    """How a round's sampled clients get trained. `round` starts round r's training of `active` and returns
    fetch(cid) -> ClientUpdate, which the server calls in client order; `stop_requested(local)` says whether any
    process of the run was asked to stop; `main` is true in the one process that logs and writes the run
    directory. Engines: InProcess (here), fedengines.torchrun.Torchrun, fedengines.flower_app.FlowerEngine."""
    main: bool

    def round(self, r: int, active: list[int], global_state: dict, client_state: dict,
              should_stop: Optional[Callable[[], bool]]) -> Callable[[int], ClientUpdate]: ...

    def stop_requested(self, local: bool) -> bool: ...

    def close(self) -> None: ...


class InProcess:
    """The reference engine: every sampled client trains in this process, one after another, each update
    folded before the next client starts (so one model's memory serves them all)."""
    main = True  # this process logs and writes the run directory

    def __init__(self, clients: Clients):
        self.c = clients

    def round(self, r, active, global_state, client_state, should_stop):
        self.c.upcoming = list(active)  # the host and disk tiers gather the next client while one trains
        return lambda cid: self.c.update(global_state, cid, r, client_state.get(cid), should_stop)

    def stop_requested(self, local: bool) -> bool:
        return local

    def close(self):
        pass


def train_one_round(r: int, clients: Clients, global_state, client_state, strategy, engine: Engine | None = None,
                    should_stop=None, flops: dict | None = None) -> tuple[dict, dict]:
    """One round on `engine` (default: in process): sample, train the active clients, fold in client order."""
    t0 = runtime.Timer()
    engine = engine or InProcess(clients)
    sampled, active = plan_round(r, clients.cfg, clients.holds)
    fetch = engine.round(r, active, global_state, client_state, should_stop)
    new_state, out = server_round(r, clients.cfg, global_state, client_state, strategy, sampled, active, fetch,
                                  clients.modalities, flops)
    out["seconds"] = round(t0(), 3)  # the whole round: training (on every engine) and the fold
    return new_state, out
