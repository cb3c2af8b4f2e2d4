"""Federated self-supervised pretraining of one vision backbone on unpaired images and audio (FSSUAVL).

    python pretrain.py                                   # the default experiment (configs/default.yaml)
    python pretrain.py configs/smoke.yaml --fed.rounds=3 --run.out_dir=runs/x
    python pretrain.py --resume --run.out_dir=runs/x     # continue a stopped run from its last round
    torchrun --standalone --nproc_per_node=2 pretrain.py CONFIG   # the same run, clients spread over 2 ranks/GPUs
    python flower_app.py CONFIG --supernodes 2           # the same run under Flower (see flower_app.py)

Writes to run.out_dir: config.yaml (resolved), log.jsonl (one JSON object per round), last.pt (the
checkpoint, rewritten atomically after every round; the one before it is kept as last.pt.prev).
"""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import distributed
import runtime
from data import MODALITIES, DataConfig, describe_partition, partition
from federation import (ClientUpdate, FedConfig, Interrupted, OptimConfig, is_shared, local_ssl_update, lr_at,
                        make_optimizer, make_strategy, run_round, sample_clients)
from finetune import knn_accuracy, probe_accuracy
from models import ModelConfig, build_model, count_params
from readers import load_data
from runtime import ConfigError, RunConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
# keys a resumed run may change; everything else must match the checkpoint's config
RESUME_MUTABLE = ("fed.rounds", "run.out_dir", "run.eval_every", "run.progress", "run.threads", "run.device", "run.compile",
                  "run.final_probe")


@dataclass
class LossConfig:
    tau: float = 0.2  # NT-Xent temperature

    def __post_init__(self):
        runtime.check_range("loss.tau", self.tau, lo=0.0, lo_open=True, hi=100.0)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.optim.warmup_rounds >= self.fed.rounds:
            raise ConfigError(f"optim.warmup_rounds={self.optim.warmup_rounds} must be below fed.rounds={self.fed.rounds} "
                              f"(the learning rate would never reach its peak)")
        if self.fed.order == "sum" and len(self.data.modalities) < 2 and self.fed.cross_modal_negatives:
            raise ConfigError("fed.cross_modal_negatives=true needs both data.modalities")
        if len(self.data.modalities) == 2 or self.fed.federation == "joint":
            img, aud, both = self.fed.modality_fractions
            for m, frac in (("image", img + both), ("audio", aud + both)):
                if m in self.data.modalities and frac <= 0:
                    raise ConfigError(f"fed.modality_fractions={list(self.fed.modality_fractions)} gives no client "
                                      f"{m} data although data.modalities includes {m}: give {m}-only or both "
                                      f"clients a positive fraction")

    @property
    def federation_modalities(self) -> tuple[str, ...]:
        """The modalities the clients hold: both in a joint federation (a one-modality run is then a baseline
        on FSSUAVL's clients), else the trained ones."""
        return MODALITIES if self.fed.federation == "joint" else tuple(self.data.modalities)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="Any config key can be overridden as --section.key=value (sections: model, data, fed, optim, "
               "loss, run), e.g. --fed.rounds=5 --optim.lr=0.1 --data.modalities=[image]. Values are parsed "
               "as literals (numbers, true/false, lists); an unknown key or a wrong type is an error naming it.")
    p.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue from RUN_DIR/last.pt (default RUN_DIR: run.out_dir)")
    p.add_argument("--show-partition", action="store_true", help="print per-client counts per class and modality, then exit")
    return runtime.parse_with_overrides(p, argv)


def resolve_config(args, overrides) -> tuple[PretrainConfig, dict | None]:
    """The run's config and, with --resume, its newest good checkpoint (last.pt, else last.pt.prev).
    --resume RUN_DIR: the checkpoint's config plus overrides. --resume alone: the given config (default
    configs/default.yaml) plus overrides, which must match the checkpoint's in every key that cannot
    change mid-run; with no checkpoint in run.out_dir yet, the run starts from scratch."""
    if not args.resume:
        return runtime.load_config(PretrainConfig, args.config or DEFAULT_CONFIG, overrides), None
    if args.resume is True:
        cfg = runtime.load_config(PretrainConfig, args.config or DEFAULT_CONFIG, overrides)
        found = runtime.load_latest_checkpoint(cfg.run.out_dir, warn=print)
        if found is None:
            print(f"--resume: no checkpoint in {cfg.run.out_dir} yet; starting the run from round 0")
            return cfg, None
        ckpt, _ = found
    else:
        run_dir = Path(runtime.expand_path(args.resume))
        if run_dir.is_file():  # a named checkpoint (e.g. RUN/last.pt.prev) is loaded exactly as named
            ckpt, path = runtime.load_checkpoint(run_dir), run_dir
        else:
            found = runtime.load_latest_checkpoint(run_dir, warn=print) if run_dir.is_dir() else None
            if found is None:
                raise runtime.CheckpointError(f"--resume {run_dir}: no last.pt or last.pt.prev there")
            ckpt, path = found
        new = yaml.safe_load(yaml.safe_dump(ckpt["config"]))
        new["run"]["out_dir"] = str(path.parent)  # the run continues where its checkpoint is
        cfg = runtime.build_dataclass(PretrainConfig, runtime.apply_overrides(new, overrides))
    # the checkpoint's config through the dataclasses, so a key added since it was written counts at its default
    saved = runtime.to_dict(runtime.build_dataclass(PretrainConfig, yaml.safe_load(yaml.safe_dump(ckpt["config"]))))
    changed = [d for d in runtime.dict_diff(saved, runtime.to_dict(cfg)) if not d.startswith(RESUME_MUTABLE)]
    if changed:
        raise ConfigError("--resume: the config differs from the checkpoint's in keys that cannot change mid-run: "
                          + "; ".join(changed) + f" (changeable: {', '.join(RESUME_MUTABLE)})")
    return cfg, ckpt


def dry_run(clients: "Clients") -> dict:
    """One local SimCLR step on the first client holding each modality; writes nothing. Checks a config end
    to end in seconds (the paper-scale configs are tested this way)."""
    cfg, data, device, model = clients.cfg, clients.data, clients.device, clients.model
    out = {}
    for m in data:
        cid = next(k for k, c in enumerate(clients.clients) if m in c)
        g = runtime.make_generator(device, cfg.run.seed, "dry_run", m)
        out.update(local_ssl_update(model, clients.optimizer, clients.scaler, data, {m: clients.clients[cid][m]},
                                    cfg.data, cfg.fed, cfg.optim, cfg.loss.tau, cfg.optim.peak_lr, g, cfg.run.amp,
                                    max_steps=1))
    print(f"dry run ok: {cfg.model.arch}, {count_params(model) / 1e6:.2f}M params, inputs "
          f"{({m: md.shape for m, md in data.items()})}, train samples {({m: len(md.train_x) for m, md in data.items()})}, "
          f"one step: " + ", ".join(f"{k}={v:.3f}" for k, v in out.items() if k.startswith("loss")))
    return out


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


def make_clients(cfg: PretrainConfig, data) -> list[dict]:
    """The run's partition: client k's {modality: training indices}, a pure function of the config."""
    return partition(data, cfg.fed.clients, cfg.fed.partition, cfg.fed.alpha, cfg.fed.modality_fractions,
                     runtime.derive_seed(cfg.run.seed, "partition"), cfg.fed.min_client_size, cfg.fed.classes_per_client,
                     cfg.federation_modalities)


def evaluate(model, data, cfg: PretrainConfig, device, probe: bool = False) -> dict:
    """kNN monitor (cosine, temperature-weighted, k suited to the bank) on held-out labelled data, per
    modality; with probe=True also the fast linear probe (`finetune.probe_accuracy`)."""
    out = {f"knn_{m}": knn_accuracy(model, md, m, cfg.data.knn_bank, cfg.data.knn_queries, k=cfg.data.knn_k,
                                    amp=cfg.run.amp) for m, md in data.items()}
    if probe:
        out.update({f"probe_{m}": probe_accuracy(model, md, m, amp=cfg.run.amp, seed=cfg.run.seed)
                    for m, md in data.items()})
    return out


def forward_flops(model, data, device) -> dict[str, int]:
    """Forward FLOPs of one sample through backbone + head, per modality, counted by torch's flop counter
    on the real model (eval mode, so no statistics move)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    out = {}
    for m, md in data.items():
        x = torch.zeros(2, *md.shape, device=device)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x, m)
        out[m] = fc.get_total_flops() // 2
    model.train(was_training)
    return out


class Clients:
    """The client side of every engine: one process's means to train any client of the federation. It holds
    the data (on its device), the partition, and one model, optimiser and scaler reused by every client it
    trains. `update` is the client function: (global state, client id, round) -> ClientUpdate, whose randomness
    comes only from (seed, round, client), so any process that holds the same data computes the same update
    (the in-process loop, a torchrun rank and a Flower ClientApp all call it)."""

    def __init__(self, cfg: PretrainConfig, device, progress: bool = False):
        self.cfg, self.device = cfg, device
        self.data = load_data(cfg.data, device, progress=progress)
        parts = make_clients(cfg, self.data)
        check_clients(cfg, parts)
        self.parts = parts  # numpy indices, for --show-partition and dry runs
        self.clients = [{m: torch.as_tensor(v, device=device) for m, v in c.items()} for c in parts]
        self.model = build_model(cfg.model, {m: md.shape for m, md in self.data.items()}).to(device)
        if cfg.model.arch.startswith("resnet"):  # NHWC convolutions: faster with cuDNN and with oneDNN on CPU
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.run.compile:  # in place, so state_dict keys stay free of torch.compile's _orig_mod. prefix
            self.model.trunk.compile()
        self.optimizer = make_optimizer(self.model, cfg.optim)
        # fp16's loss scale is the one state that outlives a client: it carries over the clients a process trains
        self.scaler = runtime.make_scaler(device, cfg.run.amp)

    def holds(self, cid: int) -> bool:
        return bool(self.clients[cid])

    def share(self, key: str) -> bool:
        return is_shared(key, self.cfg.fed.share_head)

    def update(self, global_state: dict, cid: int, r: int, private: dict | None = None,
               should_stop=None) -> ClientUpdate:
        """Client `cid`'s local SimCLR epochs of round `r` from `global_state` (plus its own unshared tensors,
        `private`). The returned state holds live model tensors: consume them before the next update."""
        cfg = self.cfg
        state = dict(global_state)
        state.update(private or {})
        self.model.load_state_dict(state)
        g = runtime.make_generator(self.device, cfg.run.seed, "client", r, cid)
        idx = {m: self.clients[cid][m] for m in self.data if m in self.clients[cid]}
        metrics = local_ssl_update(self.model, self.optimizer, self.scaler, self.data, idx, cfg.data, cfg.fed, cfg.optim,
                                   cfg.loss.tau, lr_at(r, cfg.optim, cfg.fed.rounds), g, cfg.run.amp, should_stop)
        return ClientUpdate(cid, self.model.state_dict(), {m: len(v) for m, v in idx.items()}, metrics)


def plan_round(r: int, cfg: PretrainConfig, holds) -> tuple[list[int], list[int]]:
    """The server's sampling: K of the N clients, a pure function of (seed, round), and those of them that
    hold a trained modality (the others sit the round out)."""
    sampled = sample_clients(list(range(cfg.fed.clients)), cfg.fed.clients_per_round, cfg.run.seed, r)
    return sampled, [c for c in sampled if holds(c)]


def server_round(r: int, cfg: PretrainConfig, global_state, client_state, strategy, sampled, active, fetch,
                 modalities, flops: dict | None = None) -> tuple[dict, dict]:
    """The server function: fold the updates of `active` (fetch(cid) -> ClientUpdate, called in client order,
    so every engine folds in the same order and gets the same bits) with `strategy` (one object for the whole
    run: it may keep server state across rounds). Unshared tensors go to `client_state`. Returns the new global
    state and the round's log record: what moved (bytes up/down per client) and what ran (steps, samples,
    forward FLOPs)."""
    share = lambda k: is_shared(k, cfg.fed.share_head)  # noqa: E731

    def keep_local(upd: ClientUpdate):
        local = {k: v.detach().clone() for k, v in upd.state.items() if not share(k)}
        if local:
            client_state[upd.client] = local

    new_state, per_client, rejected = run_round(global_state, active, fetch, share, keep_local, cfg.fed.weighting,
                                                strategy=strategy)
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
    out["bytes_up"] = sum(c["bytes_up"] for c in per_client)
    out["bytes_down"] = sum(c["bytes_down"] for c in per_client)
    out["per_client"] = [{"client": c["client"], "steps": c["steps"], "bytes_up": c["bytes_up"],
                          "bytes_down": c["bytes_down"], **{f"samples_{m}": c.get(f"fwd_{m}", 0) // 2 for m in modalities}}
                         for c in per_client]
    if rejected:
        out["rejected"] = rejected
        tqdm.write(f"round {r}: rejected non-finite updates from clients {rejected}"
                   + (" (all: global model kept)" if not per_client else ""))
    return new_state, out


class InProcess:
    """The reference engine: every sampled client trains in this process, one after another, each update
    folded before the next client starts (so one model's memory serves them all)."""
    main = True  # this process logs and writes the run directory

    def __init__(self, clients: Clients):
        self.c = clients

    def round(self, r, active, global_state, client_state, should_stop):
        return lambda cid: self.c.update(global_state, cid, r, client_state.get(cid), should_stop)

    def stop_requested(self, local: bool) -> bool:
        return local

    def close(self):
        pass


def train_one_round(r: int, clients: Clients, global_state, client_state, strategy, engine=None, should_stop=None,
                    flops: dict | None = None) -> tuple[dict, dict]:
    """One round on `engine` (default: in process): sample, train the active clients, fold in client order."""
    t0 = runtime.Timer()
    engine = engine or InProcess(clients)
    sampled, active = plan_round(r, clients.cfg, clients.holds)
    fetch = engine.round(r, active, global_state, client_state, should_stop)
    new_state, out = server_round(r, clients.cfg, global_state, client_state, strategy, sampled, active, fetch,
                                  tuple(clients.data), flops)
    out["seconds"] = round(t0(), 3)  # the whole round: training (on every engine) and the fold
    return new_state, out


class Diverged(runtime.UserError):
    """Every client of a round sent a non-finite update: nothing was trained, and nothing is saved as trained."""


def main(argv=None) -> dict:
    return runtime.run_main(_main, sys.argv[1:] if argv is None else argv)


def _main(argv, make_engine=None) -> dict:
    """Parse, resolve, lock the run directory, run. make_engine(clients) -> engine: how sampled clients are
    trained (default: in this process; under torchrun: spread over the ranks; flower_app passes Flower's)."""
    args, overrides = parse_args(argv)
    cfg, ckpt = resolve_config(args, overrides)
    rc = cfg.run
    out_dir = Path(rc.out_dir)
    if args.show_partition or rc.dry_run:  # these write nothing: no run directory, no lock
        return _run(args, cfg, ckpt)
    group = None
    if make_engine is None and distributed.launched():  # under torchrun: one process per rank
        group = distributed.Group(runtime.resolve_device(rc.device).type)
        make_engine = group.engine
    main_proc = group is None or group.rank == 0
    run_dir = runtime.RunDir(out_dir)
    try:  # the lock is released on every way out, so a caller in the same process can use the directory next
        err = None
        if main_proc:  # one process owns the run directory; the other ranks learn whether it could
            try:
                run_dir.prepare(resume=bool(args.resume), overwrite=rc.overwrite)
            except runtime.UserError as e:
                err = e
        if group is not None:
            msg = group.broadcast_object(None if err is None else str(err))
            if msg is not None and err is None:
                raise runtime.RunDirError(f"rank 0: {msg}")
        if err is not None:
            raise err
        if args.resume:  # read the checkpoint again now that no other run can be writing it
            cfg, ckpt = resolve_config(args, overrides)
        if ckpt is not None and ckpt["round"] > cfg.fed.rounds:
            raise ConfigError(f"fed.rounds={cfg.fed.rounds} is below the {ckpt['round']} rounds {out_dir} has already "
                              f"completed; give fed.rounds >= {ckpt['round']}, or start a new run in another run.out_dir")
        out = _run(args, cfg, ckpt, make_engine)
        if group is not None:  # leave together: a rank tearing gloo down while rank 0 still evaluates can abort
            group.barrier()
        return out
    finally:
        if main_proc:
            run_dir.release()
        if group is not None:
            group.close()


def _run(args, cfg: PretrainConfig, ckpt: dict | None, make_engine=None) -> dict:
    """Data, model, optimiser, resume, the round loop; the run directory is already prepared and locked."""
    rc = cfg.run
    out_dir = Path(rc.out_dir)
    device = distributed.local_device(runtime.resolve_device(rc.device))  # under torchrun: this rank's GPU
    if rc.threads:  # under torchrun on CPU the machine's ranks share the budget (2 ranks x 2 threads on 2 cores thrash)
        torch.set_num_threads(distributed.threads_per_rank(rc.threads, device))
    runtime.seed_everything(rc.seed, rc.deterministic)
    progress = rc.progress and sys.stderr.isatty()

    # data, partition, model, optimiser (one of each, reused by every client this process trains)
    clients = Clients(cfg, device, progress=progress)
    data = clients.data
    if args.show_partition:
        print(describe_partition(clients.parts, data))
        return {}
    if rc.dry_run:
        return dry_run(clients)
    engine = (make_engine or InProcess)(clients)
    main = engine.main  # this process logs, evaluates and writes the run directory
    holders = sum(1 for c in clients.clients if c)
    model = clients.model
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flops = forward_flops(model, data, device)
    strategy = make_strategy(cfg.fed, {k for k, _ in model.named_parameters()})  # its state goes into last.pt
    client_state: dict[int, dict] = {}
    history: list[dict] = []
    start = 1

    # resume
    log = runtime.JsonlLog(out_dir / "log.jsonl") if main else None
    if ckpt is not None:
        global_state = {k: v.to(device) for k, v in ckpt["model"].items()}
        client_state = {int(c): {k: v.to(device) for k, v in s.items()} for c, s in ckpt["client_state"].items()}
        runtime.set_rng_state(ckpt["rng"])
        strategy.load_state_dict(ckpt.get("server_state", {}))
        if ckpt.get("scaler"):  # fp16: the loss scale carries over rounds, so exact resume needs it
            clients.scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["round"] + 1
        history = list(ckpt.get("evals", []))
        if main:
            log.truncate_after(ckpt["round"])
            print(f"resuming {out_dir} from round {ckpt['round']}")
    elif main:  # a new run (or --resume of one killed before its first checkpoint): no earlier records of it count
        log.path.unlink(missing_ok=True)
    say = print if main else (lambda *a, **k: None)
    if main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(runtime.to_dict(cfg), sort_keys=False))

    env = runtime.environment_info(device)
    env["engine"] = type(engine).__name__
    n_params = count_params(model)
    say(yaml.safe_dump(runtime.to_dict(cfg), sort_keys=False).rstrip())
    say(f"env: {env}")
    say(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M params; inputs {({m: md.shape for m, md in data.items()})}; "
        f"train samples {({m: len(md.train_x) for m, md in data.items()})}; {holders} of {len(clients.clients)} clients hold "
        f"trained data; effective lr {cfg.optim.peak_lr:g}; autocast "
        f"{cfg.run.amp if runtime.amp_active(device, rc.amp) else 'off (fp32)'}; engine {env['engine']}")

    def checkpoint(r: int):
        if not main:
            return
        runtime.save_checkpoint({
            "format": runtime.CKPT_FORMAT, "round": r, "model": {k: v.cpu() for k, v in global_state.items()},
            "client_state": {c: {k: v.cpu() for k, v in s.items()} for c, s in client_state.items()},
            "config": runtime.to_dict(cfg), "rng": runtime.rng_state(), "evals": history,
            "scaler": clients.scaler.state_dict(), "server_state": strategy.state_dict(),
            "input_shapes": {m: list(md.shape) for m, md in data.items()},
            "input_stats": {m: {"mean": md.mean.tolist(), "std": md.std.tolist()} for m, md in data.items()},
            "forward_flops": flops, "env": env}, out_dir / "last.pt")

    stop = runtime.GracefulStop()
    r = start
    try:
        if ckpt is None and main:  # round 0 (the random init) is evaluated and logged once, never again on resume
            model.load_state_dict(global_state)
            ev = {"round": 0, **evaluate(model, data, cfg, device, probe=rc.final_probe)}
            history.append(ev)
            log.write(ev)
            print("random init: " + ", ".join(f"{k}={v:.2f}" for k, v in ev.items() if k != "round"))
            checkpoint(0)
        bar = tqdm(range(start, cfg.fed.rounds + 1), desc="rounds", disable=not (progress and main), initial=start - 1,
                   total=cfg.fed.rounds)
        for r in bar:
            if engine.stop_requested(stop.requested):
                raise Interrupted
            global_state, metrics = train_one_round(r, clients, global_state, client_state, strategy, engine,
                                                    lambda: stop.requested, flops)
            if metrics.get("rejected") and not metrics["per_client"]:
                if main:
                    log.write({**metrics, "diverged": True})
                raise Diverged(f"round {r}: every sampled client's update was non-finite (NaN/Inf loss or weights), so "
                               f"the run diverged and round {r} was not saved; {out_dir}/last.pt holds round {r - 1}. "
                               f"Lower optim.lr (effective {cfg.optim.peak_lr:g}), set optim.grad_clip, or use "
                               f"run.amp=fp32, then start again")
            if main and (r == cfg.fed.rounds or (rc.eval_every and r % rc.eval_every == 0)):
                model.load_state_dict(global_state)
                ev = evaluate(model, data, cfg, device, probe=rc.final_probe and r == cfg.fed.rounds)
                metrics.update(ev)
                history.append({"round": r, **ev})
            if main:
                log.write(metrics)
            checkpoint(r)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k.startswith(("loss", "knn"))})
            if main and not progress:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                               if k not in ("clients", "per_client")), flush=True)
    except Interrupted:
        signum = stop.signum or signal.SIGTERM  # a torchrun rank may stop because another rank was signalled
        if main:
            launcher = "torchrun --nproc_per_node=G pretrain.py" if distributed.launched() else "python pretrain.py"
            print(f"\n{signal.Signals(signum).name}: stopped during round {r}; {out_dir}/last.pt holds round {r - 1}, "
                  f"the last completed one. Resume with: {launcher} --resume {out_dir}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        stop.restore()
        engine.close()

    if not main:
        return {}
    first, final = history[0], history[-1]
    for kind, what in (("probe", "linear probe"), ("knn", "kNN")):
        for m in data:
            a, b = first.get(f"{kind}_{m}"), final.get(f"{kind}_{m}")
            if a is not None and b is not None:
                print(f"{what} {m}: random init {a:.2f}% -> round {final['round']} {b:.2f}% ({b - a:+.2f})")
    print(f"results in {out_dir}/: config.yaml, log.jsonl, last.pt")
    return {"history": history, "out_dir": str(out_dir)}


if __name__ == "__main__":
    main()
