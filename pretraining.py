"""Running a whole federated pretraining from a config: resolve it (and what a resume may change), lock the run
directory, build data, clients and model, resume, then the round loop with its monitor, checkpoints, log and
stop signals. `pretrain(...)` is the public function; `cli(argv)` is pretrain.py's command line, which the Flower
ServerApp drives too (with its own engine).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import runtime
from fedengines import torchrun
from catalog import expected_input
from checkpoints import CKPT_FORMAT, CheckpointError, JsonlLog, RunDir, RunDirError, TensorBoardLog, launcher, \
    load_checkpoint, load_latest_checkpoint, refuse_restart, save_checkpoint
from engine import Clients, InProcess, LostWorker, PretrainConfig, train_one_round
from diagnostics import representation_metrics
from evaluation import RawInput, knn_accuracy, probe_accuracy
from local_update import Interrupted, local_ssl_update
from models import build_model, count_params
from residency import MappedFileChanged
from partition import describe_partition
from settings import ConfigError, UserError, apply_overrides, build_dataclass, dict_diff, expand_path, load_config, \
    parse_with_overrides, to_dict
from strategies import STRATEGIES, make_strategy

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
# keys a resumed run may change; everything else must match the checkpoint's config
RESUME_MUTABLE = ("fed.rounds", "run.out_dir", "run.eval_every", "run.progress", "run.threads", "run.device", "run.compile",
                  "run.final_probe", "run.tensorboard")


RUNAWAY_RATIO = 100.0   # global weight norm / its value at random init: a run past this has not learned, it blew up
RUNAWAY_WARN = 10.0     # ... and past this, one warning (a normal run stays within a few percent: docs/reliability.md)


class Diverged(UserError):
    """Every client of a round sent a non-finite update: nothing was trained, and nothing is saved as trained."""


class Runaway(UserError):
    """The global weights grew by orders of magnitude: the run did not learn; its last.pt is kept, marked."""


def weight_norm(state: dict, keys) -> float:
    """The L2 norm of the parameters (not the buffers) of a state dict, in fp64."""
    return float(sum(state[k].detach().double().pow(2).sum() for k in keys).sqrt())


def likely_cause(cfg: PretrainConfig) -> str:
    """The setting most likely behind a run that blew up or diverged, named for the user to change."""
    strategy = STRATEGIES[cfg.fed.aggregation]
    cause = strategy.likely_cause(strategy.params_of(cfg.fed), cfg.optim.peak_lr)
    if cause:
        return cause
    if cfg.loss.name == "nt_xent" and cfg.loss.tau < 0.05:
        return f"the temperature: raise loss.tau ({cfg.loss.tau:g}; SimCLR uses 0.1-0.5)"
    return (f"the learning rate: lower optim.lr (effective {cfg.optim.peak_lr:g}), or set optim.grad_clip"
            + (", or use run.amp=fp32" if cfg.run.amp == "fp16" else ""))


def parse_args(argv, description: str = __doc__):
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="Any config key can be overridden as --section.key=value (sections: model, data, fed, optim, "
               "loss, run), e.g. --fed.rounds=5 --optim.lr=0.1 --data.modalities=[image]. Values are parsed "
               "as literals (numbers, true/false, lists); an unknown key or a wrong type is an error naming it.")
    p.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue from RUN_DIR/last.pt (default RUN_DIR: run.out_dir)")
    p.add_argument("--show-partition", action="store_true", help="print per-client counts per class and modality, then exit")
    return parse_with_overrides(p, argv)


def resolve_config(config, overrides, resume) -> tuple[PretrainConfig, dict | None]:
    """The run's config and, with `resume`, its newest good checkpoint (last.pt, else last.pt.prev).
    resume=RUN_DIR: the checkpoint's config plus overrides. resume=True: the given config (default
    configs/default.yaml) plus overrides, which must match the checkpoint's in every key that cannot
    change mid-run; with no checkpoint in run.out_dir yet, the run starts from scratch."""
    if not resume:
        return load_config(PretrainConfig, config or DEFAULT_CONFIG, overrides), None
    if resume is True:
        cfg = load_config(PretrainConfig, config or DEFAULT_CONFIG, overrides)
        found = load_latest_checkpoint(cfg.run.out_dir, warn=print)
        if found is None:
            refuse_restart(cfg.run.out_dir)
            print(f"--resume: no checkpoint in {cfg.run.out_dir} yet; starting the run from round 0")
            return cfg, None
        ckpt, _ = found
    else:
        if config:
            raise ConfigError(f"--resume {resume} continues that run with the config saved in its checkpoint, so the config "
                              f"file {config} would be ignored: drop it, or give `{config} --resume "
                              f"--run.out_dir={resume}` to check it against the checkpoint")
        run_dir = Path(expand_path(resume, "--resume"))
        if run_dir.is_file():  # a named checkpoint (e.g. RUN/last.pt.prev) is loaded exactly as named
            ckpt, path = load_checkpoint(run_dir), run_dir
        else:
            found = load_latest_checkpoint(run_dir, warn=print) if run_dir.is_dir() else None
            if found is None and (run_dir / "config.yaml").is_file():  # stopped before its first checkpoint
                refuse_restart(run_dir)
                print(f"--resume {run_dir}: no checkpoint yet; starting the run from round 0 with its config.yaml")
                return load_config(PretrainConfig, run_dir / "config.yaml", [f"--run.out_dir={run_dir}", *overrides]), None
            if found is None:
                raise CheckpointError(f"--resume {run_dir}: no last.pt, last.pt.prev or config.yaml there: nothing to "
                                      f"continue; start a run with `{launcher()} CONFIG --run.out_dir={run_dir}`")
            ckpt, path = found
        new = yaml.safe_load(yaml.safe_dump(ckpt["config"]))
        new["run"]["out_dir"] = str(path.parent)  # the run continues where its checkpoint is
        cfg = build_dataclass(PretrainConfig, apply_overrides(new, overrides))
    changed = config_changes(ckpt, cfg)
    if changed:
        raise ConfigError("--resume: the config differs from the checkpoint's in keys that cannot change mid-run: "
                          + "; ".join(changed) + f" (changeable: {', '.join(RESUME_MUTABLE)})")
    check_weights_fit(ckpt, cfg)
    return cfg, ckpt


def check_weights_fit(ckpt: dict, cfg: PretrainConfig) -> None:
    """Before any data is read: the model the checkpoint's config builds must hold exactly its weights. A config
    edited (and the file signed again) to another model or other inputs is named here, not as a missing dataset."""
    shapes = {m: tuple(s) for m, s in ckpt.get("input_shapes", {}).items()}
    if set(shapes) != set(cfg.data.modalities):
        raise ConfigError(f"this checkpoint's config does not belong to its weights: data.modalities="
                          f"{list(cfg.data.modalities)} but the weights were trained on {sorted(shapes)}")
    for m, expect in expected_input(cfg.data).items():
        if shapes[m][:len(expect)] != expect:
            raise ConfigError(f"this checkpoint's config does not belong to its weights (was it edited and signed "
                              f"again?): data.dataset={cfg.data.dataset} with its data options gives {m} inputs "
                              f"({', '.join(map(str, expect))}{', ...' if len(expect) < len(shapes[m]) else ''}) but the weights were "
                              f"trained on {shapes[m]}")
    want = {k: tuple(v.shape) for k, v in build_model(cfg.model, shapes).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    wrong = sorted(set(want) ^ set(have)) + [k for k in want if k in have and want[k] != have[k]]
    if wrong:
        raise ConfigError(f"this checkpoint's config does not belong to its weights (was it edited and signed again?): "
                          f"the model it builds differs at {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")


def config_changes(ckpt: dict, cfg: PretrainConfig) -> list[str]:
    """The keys (outside RESUME_MUTABLE) in which `cfg` differs from the config a checkpoint was trained with, read
    through the dataclasses, so a key added since the checkpoint was written counts at its default."""
    saved = to_dict(build_dataclass(PretrainConfig, yaml.safe_load(yaml.safe_dump(ckpt["config"]))))
    return [d for d in dict_diff(saved, to_dict(cfg)) if not d.startswith(RESUME_MUTABLE)]


def dry_run(clients: Clients) -> dict:
    """One local step on the first client holding each modality; writes nothing. Checks a config end to end in
    seconds (the paper-scale configs are tested this way)."""
    cfg, data, device, model = clients.cfg, clients.data, clients.device, clients.model
    out = {}
    for m in data:
        cid = next(k for k, c in enumerate(clients.clients) if m in c)
        g = runtime.make_generator(device, cfg.run.seed, "dry_run", m)
        out.update(local_ssl_update(model, clients.optimizer, clients.scaler, data, {m: clients.clients[cid][m]},
                                    clients.settings, cfg.optim.peak_lr, g, max_steps=1))
    print(f"dry run ok: {cfg.model.arch}, {count_params(model) / 1e6:.2f}M params, inputs "
          f"{({m: md.shape for m, md in data.items()})}, train samples {({m: len(md.train_x) for m, md in data.items()})}, "
          f"one step: " + ", ".join(f"{k}={v:.3f}" for k, v in out.items() if k.startswith("loss")))
    return out


def evaluate(model, data, cfg: PretrainConfig, probe: bool = False, raw_input: bool = False) -> dict:
    """The monitor of one evaluation round, per modality: kNN on standardised features (`knn_M`), with probe=True
    the fast linear probe (`probe_M`), and the representation diagnostics (`diagnostics.representation_metrics`).
    raw_input=True adds the same probe and kNN on the input itself (`raw_probe_M`, `raw_knn_M`): the bar a
    representation has to clear (round 0 only: it does not change with training)."""
    seed, amp = cfg.run.seed, cfg.run.amp
    models = [("", model)] + ([("raw_", RawInput({m: md.shape for m, md in data.items()}, next(model.parameters()).device))]
                              if raw_input else [])
    out = {}
    for prefix, net in models:
        for m, md in data.items():
            out[f"{prefix}knn_{m}"] = knn_accuracy(net, md, m, bank_size=cfg.data.knn_bank, queries=cfg.data.knn_queries, k=cfg.data.knn_k,
                                                   amp=amp, seed=seed)
            if probe:
                out[f"{prefix}probe_{m}"] = probe_accuracy(net, md, m, amp=amp, seed=seed)
    out.update(representation_metrics(model, data, cfg.data, amp, seed))
    return out


def forward_flops(model, shapes: dict, device) -> dict[str, int]:
    """Forward FLOPs of one sample through backbone + head, per modality ({modality: input shape}), counted by
    torch's flop counter on the real model (eval mode, so no statistics move)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    out = {}
    for m, shape in shapes.items():
        x = torch.zeros(2, *shape, device=device)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x, m)
        out[m] = fc.get_total_flops() // 2
    model.train(was_training)
    return out


def cli(argv, make_engine=None, make_clients=None) -> dict:
    """pretrain.py's command line: parse, then `pretrain`. make_engine(clients) -> Engine: how sampled clients
    are trained (default: in this process; under torchrun: spread over the ranks; flower_app passes Flower's).
    make_clients(cfg, device, progress) -> the server's view of the clients (default engine.Clients: the config's
    dataset and partition; a Flower deployment with node-local data passes nodes.NodeFederation)."""
    args, overrides = parse_args(argv)
    return pretrain(args.config, overrides, args.resume, args.show_partition, make_engine, make_clients)


def pretrain(config=None, overrides=(), resume=False, show_partition: bool = False, make_engine=None,
             make_clients=None) -> dict:
    """Run a whole pretraining: `config` (a YAML path; default configs/default.yaml) plus dotted `overrides`;
    resume=True continues run.out_dir, resume=RUN_DIR continues that run with its own config. Locks the run
    directory for the whole run. Returns {"history": [eval records], "out_dir": ...} in the main process."""
    cfg, ckpt = resolve_config(config, overrides, resume)
    if show_partition or cfg.run.dry_run:  # these write nothing: no run directory, no lock
        return Pretraining(cfg, make_engine, make_clients).inspect(show_partition)
    group = None
    if make_engine is None and torchrun.launched():  # under torchrun: one process per rank
        group = torchrun.Group(runtime.resolve_device(cfg.run.device).type)
        make_engine = group.engine
    main_proc = group is None or group.rank == 0
    run_dir = RunDir(Path(cfg.run.out_dir))
    # one process: a stop during start-up has nothing to finish and ends the run at once (torchrun's ranks stop
    # together at a round's boundary instead, so none is left waiting in a collective)
    stop = runtime.GracefulStop(immediate=True) if group is None else None
    try:  # the lock is released on every way out, so a caller in the same process can use the directory next
        err = None
        if main_proc:  # one process owns the run directory; the other ranks learn whether it could
            try:
                run_dir.prepare(resume=bool(resume), overwrite=cfg.run.overwrite)
            except UserError as e:
                err = e
        if group is not None:
            msg = group.broadcast_object(None if err is None else str(err))
            if msg is not None and err is None:
                raise RunDirError(f"rank 0: {msg}")
        if err is not None:
            raise err
        if resume:  # read the checkpoint again now that no other run can be writing it
            cfg, ckpt = resolve_config(config, overrides, resume)
        if ckpt is not None and ckpt["round"] > cfg.fed.rounds:
            raise ConfigError(f"fed.rounds={cfg.fed.rounds} is below the {ckpt['round']} rounds {cfg.run.out_dir} has "
                              f"already completed; give fed.rounds >= {ckpt['round']}, or start a new run in another "
                              f"run.out_dir")
        try:
            out = Pretraining(cfg, make_engine, make_clients, stop).run(ckpt)
        except Interrupted:  # during start-up (the round loop handles its own)
            signum = stop.signum or signal.SIGTERM
            saved = f"{cfg.run.out_dir}/last.pt holds round {ckpt['round']}" if ckpt else "nothing was trained or saved"
            print(f"\n{signal.Signals(signum).name}: stopped during start-up; {saved}", file=sys.stderr)
            sys.exit(128 + signum)
        except SystemExit:  # a stop every rank agreed on (one all-reduce a round): leave together, as below
            if group is not None:
                group.barrier()
            raise
        if group is not None:  # leave together: a rank tearing gloo down while rank 0 still evaluates can abort
            group.barrier()
        return out
    finally:
        if stop is not None:
            stop.restore()
        if main_proc:
            run_dir.release()
        if group is not None:
            group.close()


class Pretraining:
    """One run: data, clients, model and optimiser (one of each, reused by every client this process trains),
    the server's state, and the round loop. The run directory is already prepared and locked."""

    def __init__(self, cfg: PretrainConfig, make_engine=None, make_clients=None, stop=None):
        rc = cfg.run
        self.cfg, self.make_engine = cfg, make_engine
        self.stop = stop  # pretrain's, from start-up on; None: the loop makes its own
        self.out_dir = Path(rc.out_dir)
        self.device = torchrun.local_device(runtime.resolve_device(rc.device))  # under torchrun: this rank's GPU
        if rc.threads:  # under torchrun on CPU the ranks of a machine share the budget
            torch.set_num_threads(torchrun.threads_per_rank(rc.threads, self.device))
        runtime.seed_everything(rc.seed, rc.deterministic, self.device, rc.compile)
        self.progress = rc.progress and sys.stderr.isatty()
        self.clients = (make_clients or Clients)(cfg, self.device, progress=self.progress)
        self.data, self.model = self.clients.data, self.clients.model

    def inspect(self, show_partition: bool) -> dict:
        if show_partition:
            print(describe_partition(self.clients.parts, self.data))
            return {}
        return dry_run(self.clients)

    def run(self, ckpt: dict | None) -> dict:
        cfg, model = self.cfg, self.model
        self.engine = (self.make_engine or InProcess)(self.clients)
        if not cfg.optim.reset_state and not isinstance(self.engine, InProcess):
            raise ConfigError(f"optim.reset_state=false (the centralised bound) keeps the optimiser of the process that "
                              f"trains, which {type(self.engine).__name__} does not: run it in process (python pretrain.py)")
        self.main = self.engine.main  # this process logs, evaluates and writes the run directory
        self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.flops = forward_flops(model, self.clients.input_shapes, self.device)
        self.param_keys = [k for k, _ in model.named_parameters()]
        self.strategy = make_strategy(cfg.fed, set(self.param_keys))  # its state goes into last.pt
        self.norm0 = weight_norm(self.global_state, self.param_keys)  # the random init's, kept in last.pt
        self.runaway, self.warned = None, False
        self.client_state: dict[int, dict] = {}
        self.history: list[dict] = []
        self.saved = ckpt["round"] if ckpt is not None else None  # the round last.pt holds
        self.log = JsonlLog(self.out_dir / "log.jsonl") if self.main else None
        start = self.resume(ckpt) if ckpt is not None else 1
        if ckpt is None and self.main:  # a new run (or --resume of one killed before its first checkpoint)
            self.log.path.unlink(missing_ok=True)
        self.tb = TensorBoardLog(self.out_dir / "tensorboard", start if ckpt else 0) if self.main and cfg.run.tensorboard else None
        if self.main:
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.env = runtime.environment_info(self.device)
        self.env["engine"] = type(self.engine).__name__
        self.describe()
        self.loop(start, first=ckpt is None)
        return self.summary() if self.main else {}

    def resume(self, ckpt: dict) -> int:
        dev = self.device
        self.global_state = {k: v.to(dev) for k, v in ckpt["model"].items()}
        self.client_state = {int(c): {k: v.to(dev) for k, v in s.items()} for c, s in ckpt["client_state"].items()}
        runtime.set_rng_state(ckpt["rng"])
        self.strategy.load_state_dict(ckpt.get("server_state", {}))
        if ckpt.get("scaler"):  # fp16: the loss scale carries over rounds, so exact resume needs it
            self.clients.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("optimizer"):  # optim.reset_state=false: the momentum carries over rounds too
            self.clients.optimizer.load_state_dict(ckpt["optimizer"])
        self.history = list(ckpt.get("evals", []))
        self.norm0 = ckpt.get("weight_norm0", self.norm0)
        if self.main:
            lost = self.log.truncate_after(ckpt["round"], warn=print)
            if lost:
                print(f"warning: {self.log.path} has no record of rounds {lost} (deleted or lost); the run resumes, but "
                      f"whatever is summed from the log (Table 4's costs, the curves) will miss those rounds")
            print(f"resuming {self.out_dir} from round {ckpt['round']}")
        return ckpt["round"] + 1

    def describe(self) -> None:
        if not self.main:
            return
        cfg, clients = self.cfg, self.clients
        holders = sum(1 for c in clients.clients if c)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        print(f"env: {self.env}")
        print(f"model: {cfg.model.arch}, {count_params(self.model) / 1e6:.2f}M params; inputs "
              f"{clients.input_shapes}; train samples {clients.train_samples}; "
              f"{holders} of {len(clients.clients)} clients hold trained data; effective lr {cfg.optim.peak_lr:g}; "
              f"autocast {cfg.run.amp if runtime.amp_active(self.device, cfg.run.amp) else 'off (fp32)'}; "
              f"engine {self.env['engine']}")
        if not runtime.deterministic_on(cfg.run.deterministic, self.device):
            print("note: run.deterministic is off, so the same seed may not repeat these numbers to the digit "
                  "(--run.deterministic=true makes it repeat, at some speed on CUDA)")

    def checkpoint(self, r: int) -> None:
        if not self.main:
            return
        save_checkpoint({
            "format": CKPT_FORMAT, "round": r, "model": {k: v.cpu() for k, v in self.global_state.items()},
            "client_state": {c: {k: v.cpu() for k, v in s.items()} for c, s in self.client_state.items()},
            "config": to_dict(self.cfg), "rng": runtime.rng_state(), "evals": self.history,
            "scaler": self.clients.scaler.state_dict(), "server_state": self.strategy.state_dict(),
            "input_shapes": {m: list(s) for m, s in self.clients.input_shapes.items()},
            "input_stats": self.clients.input_stats(),
            "forward_flops": self.flops, "env": self.env, "weight_norm0": self.norm0,
            **({} if self.cfg.optim.reset_state else {"optimizer": self.clients.optimizer.state_dict()}),
            **({"runaway": self.runaway} if self.runaway else {})}, self.out_dir / "last.pt")
        self.saved = r

    def record(self, rec: dict) -> None:
        """One record of the run's log (log.jsonl; also TensorBoard's event files with run.tensorboard)."""
        self.log.write(rec)
        if self.tb is not None:
            self.tb.write(rec)

    def evaluate(self, r: int, probe: bool, raw_input: bool = False) -> dict:
        self.model.load_state_dict(self.global_state)
        ev = evaluate(self.model, self.data, self.cfg, probe=probe, raw_input=raw_input)
        self.history.append({"round": r, **ev})
        return ev

    def loop(self, start: int, first: bool) -> None:
        cfg, rc = self.cfg, self.cfg.run
        stop = self.stop or runtime.GracefulStop()
        r = start
        try:
            if first and self.main and not self.data:  # a server with no labelled data: nothing to evaluate on
                print("no labelled evaluation data on the server: the kNN monitor and the final probe are skipped")
                self.checkpoint(0)
            elif first and self.main:  # round 0 (the random init) is evaluated and logged once, never again on resume
                ev = self.evaluate(0, probe=rc.final_probe, raw_input=True)
                self.record({"round": 0, **ev})
                print("random init: " + ", ".join(f"{k}={v:.2f}" for k, v in ev.items() if k.startswith(("knn", "probe"))))
                print("raw input:   " + ", ".join(f"{k[4:]}={v:.2f}" for k, v in ev.items() if k.startswith("raw_")))
                self.checkpoint(0)
            bar = tqdm(range(start, cfg.fed.rounds + 1), desc="rounds", disable=not (self.progress and self.main),
                       initial=start - 1, total=cfg.fed.rounds)
            for r in bar:
                self.one_round(r, stop)
                bar.set_postfix({k: f"{v:.3g}" for k, v in self.last.items() if k.startswith(("loss", "probe"))})
        except (LostWorker, MappedFileChanged) as e:
            raise type(e)(f"round {r}: {e}; {self.out_dir}/last.pt holds round {self.saved}, the last completed one. "
                          f"Resume with: {launcher()} --resume {self.out_dir}") from e
        except Interrupted:
            signum = stop.signum or signal.SIGTERM  # a torchrun rank may stop because another rank was signalled
            if self.main and self.saved is None:
                print(f"\n{signal.Signals(signum).name}: stopped before round 0 was saved; nothing was trained: run "
                      f"the same command again", file=sys.stderr)
            elif self.main:
                print(f"\n{signal.Signals(signum).name}: stopped during round {r}; {self.out_dir}/last.pt holds round "
                      f"{self.saved}, the last completed one. Resume with: {launcher()} --resume {self.out_dir}",
                      file=sys.stderr)
            sys.exit(128 + signum)
        finally:
            if stop is not self.stop:
                stop.restore()
            self.engine.close()
            if self.tb is not None:
                self.tb.close()

    def one_round(self, r: int, stop) -> None:
        """Train, fold, evaluate when due, log, checkpoint. A stop during training finishes the step; one during
        the evaluation ends it at once (round r is then trained again on resume)."""
        cfg, rc = self.cfg, self.cfg.run
        stop.immediate = False
        if self.engine.stop_requested(stop.requested):
            raise Interrupted
        self.global_state, metrics = train_one_round(r, self.clients, self.global_state, self.client_state,
                                                     self.strategy, self.engine, lambda: stop.requested, self.flops)
        if metrics.get("rejected") and not metrics["per_client"]:
            if self.main:
                self.record({**metrics, "diverged": True})
            raise Diverged(f"round {r}: every sampled client's update was non-finite (NaN/Inf loss or weights), so "
                           f"the run diverged and round {r} was not saved; {self.out_dir}/last.pt holds round {r - 1}. "
                           f"Likely cause: {likely_cause(cfg)}; then start again")
        ratio = weight_norm(self.global_state, self.param_keys) / max(self.norm0, 1e-12)
        metrics["weight_norm_ratio"] = round(ratio, 4)  # to the random init's
        if ratio > RUNAWAY_WARN and not self.warned and self.main:
            self.warned = True
            tqdm.write(f"warning: round {r}: the global weights' norm is {ratio:.3g}x the random init's and growing; "
                       f"likely cause: {likely_cause(cfg)}")
        if ratio > RUNAWAY_RATIO:
            self.runaway = {"round": r, "weight_norm_ratio": ratio}
            if self.main:
                self.record({**metrics, "runaway": True})
            self.checkpoint(r)
            raise Runaway(f"round {r}: the global weights' norm reached {ratio:.3g}x the random init's (runaway: the run "
                          f"is not learning); {self.out_dir}/last.pt holds round {r}, marked as a runaway, and is not a "
                          f"trained model. Likely cause: {likely_cause(cfg)}; then start again")
        if self.main and self.data and (r == cfg.fed.rounds or (rc.eval_every and r % rc.eval_every == 0)):
            stop.immediate = self.stop is stop  # only pretrain's own stop: a torchrun rank waits for the others
            if stop.immediate and stop.requested:
                raise Interrupted
            metrics.update(self.evaluate(r, probe=rc.final_probe))
            stop.immediate = False
        if self.main:
            self.record(metrics)
        self.checkpoint(r)
        self.last = metrics
        if self.main and not self.progress:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                           if k not in ("clients", "per_client")), flush=True)

    def summary(self) -> dict:
        first, final = (self.history[0], self.history[-1]) if self.history else ({}, {})
        for kind, what in (("probe", "linear probe"), ("knn", "kNN")):
            for m in self.data:
                a, b, raw = first.get(f"{kind}_{m}"), final.get(f"{kind}_{m}"), first.get(f"raw_{kind}_{m}")
                if a is not None and b is not None:
                    bar = "" if raw is None else (f"; raw input {raw:.2f}% ({b - raw:+.2f}: "
                                                  f"{'beats' if b > raw else 'does not beat'} the input)")
                    print(f"{what} {m}: random init {a:.2f}% -> round {final['round']} {b:.2f}% ({b - a:+.2f}){bar}")
        print(f"results in {self.out_dir}/: config.yaml, log.jsonl, last.pt")
        return {"history": self.history, "out_dir": str(self.out_dir)}
