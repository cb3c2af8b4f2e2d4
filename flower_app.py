"""The Flower engine: our federation as a Flower App (a ServerApp and a ClientApp on flwr's Message API).

    python flower_app.py CONFIG [--key=value ...] [--resume] [--supernodes 2]   # Flower's Simulation Engine
    flwr run . CONNECTION --run-config "config='CONFIG' overrides='--key=value ...'"   # a SuperLink (README)

The ServerApp is `pretrain.py`'s run (pretraining.cli) with a Flower engine: it samples clients with our sample_clients(seed,
round), sends each sampled client's node the global arrays with the client id, the round, its learning rate
(the ClientApp checks it against its own schedule) and the run's config, folds the replies with our strategy
in client order (per-modality sample counts travel in the reply's metrics, so fed.weighting=modality works), and writes config.yaml, log.jsonl and last.pt exactly as pretrain.py does,
so finetune.py and paper_tables.py read a Flower run unchanged and --resume continues one. Each ClientApp process
loads the data once and trains whichever client ids it is sent with `engine.Clients.update`, the client
function of every engine: on the same config and seed the global weights equal the in-process run's.
Client i goes to the i % S-th SuperNode (node ids sorted), S the number of SuperNodes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import pretraining
import runtime
from engine import Clients, PretrainConfig
from federation import ClientUpdate
from local_update import lr_at
from modality_specs import MODALITIES
from settings import ConfigError, UserError, build_dataclass, to_dict

ROOT = Path(__file__).resolve().parent


class FlowerError(UserError):
    """A Flower run could not go on (no SuperNodes, a ClientApp failed, a reply went missing)."""


class FlowerEngine:
    """The Flower engine (engine.Engine) on a Flower Grid, driven by pretraining.Pretraining like engine.InProcess."""
    main = True

    def __init__(self, grid: Grid, clients: "Clients", min_nodes: int = 1, wait_s: float = 120.0):
        cfg = clients.cfg
        if not cfg.fed.share_head:
            raise ConfigError("fed.share_head=false keeps each client's head on the client between rounds, "
                                      "which the Flower engine does not do (a SuperNode serves many client ids); "
                                      "run it in process or under torchrun")
        self.grid, self.c = grid, clients
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        t0 = time.monotonic()
        while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
            if time.monotonic() - t0 > wait_s:
                raise FlowerError(f"{len(nodes)} SuperNodes connected after {wait_s:.0f} s, {min_nodes} wanted "
                                  f"(run config min-nodes): start them, or lower min-nodes")
            time.sleep(1.0)
        self.nodes = nodes

    def node_of(self, cid: int) -> int:
        return self.nodes[cid % len(self.nodes)]

    def round(self, r, active, global_state, client_state, should_stop):
        t0 = time.monotonic()
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in global_state.items()})
        msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {"client": cid, "round": r, "lr": lr_at(r, self.c.cfg.optim, self.c.cfg.fed.rounds),
                     "config": self.config_yaml})}),
                    dst_node_id=self.node_of(cid), message_type="train", group_id=str(r))
                for cid in active]
        updates = {}
        for rep in self.grid.send_and_receive(msgs):
            if rep.has_error():
                raise FlowerError(f"round {r}: a ClientApp failed ({rep.error.code}): {rep.error.reason}")
            m = dict(rep.content["metrics"])
            cid = int(m.pop("client"))
            samples = {mod: int(m.pop(f"n_{mod}")) for mod in MODALITIES if f"n_{mod}" in m}
            state = {k: v.to(self.c.device) for k, v in rep.content["arrays"].to_torch_state_dict().items()}
            updates[cid] = ClientUpdate(cid, state, samples, m)
        missing = sorted(set(active) - set(updates))
        if missing:  # the run stops: a redone round would sample other clients than the seed's, changing the run
            raise FlowerError(f"round {r}: no reply for clients {missing} from SuperNodes "
                              f"{sorted({self.node_of(c) for c in missing})} (disconnected?); "
                              f"{self.c.cfg.run.out_dir}/last.pt holds round {r - 1}: resume with run config resume=true")
        by_node: dict[int, dict] = {}
        for cid, u in sorted(updates.items()):
            n = by_node.setdefault(self.node_of(cid), {})
            for m, k in u.samples.items():
                n[m] = n.get(m, 0) + k
        tqdm.write(f"round {r}: {len(updates)} clients on {len(by_node)} SuperNodes in {time.monotonic() - t0:.1f} s: "
                   + "; ".join(f"node {node}: " + ", ".join(f"{k} {m}" for m, k in n.items()) for node, n in by_node.items()))
        return updates.pop

    def stop_requested(self, local: bool) -> bool:
        return local

    def close(self):
        pass


# ----------------------------------------------------------------------------- the ServerApp

server_app = ServerApp()
_SIM = {}  # python flower_app.py: the argv for the ServerApp, and what it raised (it runs in a thread)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if "argv" in _SIM:
        argv, min_nodes = _SIM["argv"], 1
    else:  # flwr run: the run config of pyproject.toml, overridden with --run-config
        config = Path(str(rc.get("config", "configs/default.yaml")))  # a relative path: one of the app's configs
        argv = [str(config if config.is_absolute() else ROOT / config)] + shlex.split(str(rc.get("overrides", "")))
        argv += ["--resume"] if rc.get("resume", False) else []
        min_nodes = int(rc.get("min-nodes", 1))
    try:
        pretraining.cli(argv, make_engine=lambda clients: FlowerEngine(grid, clients, min_nodes))
    except BaseException as e:  # noqa: BLE001  (handed to the caller of the simulation, then re-raised)
        _SIM["error"] = e
        raise


# ----------------------------------------------------------------------------- the ClientApp

client_app = ClientApp()
_CLIENTS: dict[str, "Clients"] = {}  # one per config this process serves: the data load once


def _clients_for(config_yaml: str) -> "Clients":
    if config_yaml not in _CLIENTS:
        _CLIENTS.clear()  # a new run: let the last one's data go
        cfg = build_dataclass(PretrainConfig, yaml.safe_load(config_yaml))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        device = runtime.resolve_device(cfg.run.device)
        runtime.seed_everything(cfg.run.seed, cfg.run.deterministic, device)
        _CLIENTS[config_yaml] = Clients(cfg, device)
    return _CLIENTS[config_yaml]


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    clients = _clients_for(str(conf["config"]))
    cid, r = int(conf["client"]), int(conf["round"])
    lr = lr_at(r, clients.cfg.optim, clients.cfg.fed.rounds)
    if float(conf["lr"]) != lr:  # the same config on both sides gives the same schedule; anything else is drift
        raise FlowerError(f"round {r}: the server sent lr {conf['lr']} but this ClientApp's config gives {lr}")
    state = {k: v.to(clients.device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    upd = clients.update(state, cid, r)
    shared = {k: v.detach().cpu() for k, v in upd.state.items() if clients.share(k)}
    metrics = {"client": cid, **{f"n_{m}": n for m, n in upd.samples.items()},
               **{k: v for k, v in upd.metrics.items() if isinstance(v, (int, float))}}
    return Message(RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord(metrics)}), reply_to=msg)


# ----------------------------------------------------------------------------- python flower_app.py: simulation

def simulate(argv, supernodes: int = 2, client_cpus: float = 1.0, client_gpus: float = 0.0) -> None:
    """Run pretrain.py's federation (argv as for pretrain.py) under Flower's Simulation Engine with
    `supernodes` virtual SuperNodes, each ClientApp given client_cpus CPUs and client_gpus GPUs."""
    from flwr.simulation import run_simulation
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    _SIM.clear()
    _SIM["argv"] = list(argv)
    resources = {"num_cpus": client_cpus, "num_gpus": client_gpus}
    os.environ["FSSUAVL_LAUNCHER"] = f"python flower_app.py --supernodes {supernodes}"  # the resume advice
    # Ray as Flower's backend would start it, but here, so that our handlers are installed after Ray's: Ray hands
    # SIGTERM to abseil's failure handler, which aborts the process 3 s later (exit 134, no resume line)
    import ray
    if not ray.is_initialized():
        pythonpath = os.pathsep.join(sys.path + [os.environ["PYTHONPATH"]])
        os.environ["PYTHONPATH"] = pythonpath
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False)
    stop = runtime.GracefulStop()  # the ServerApp's loop runs in a thread: it follows this main-thread handler
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=supernodes,
                       backend_config={"client_resources": resources, "init_args": {"include_dashboard": False}})
    finally:
        stop.restore()
        _SIM.pop("argv", None)
    err = _SIM.pop("error", None)
    if err is not None:
        raise err


def parse_args(argv):
    """(the engine's options, pretrain.py's argv)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--supernodes", type=int, default=2, help="virtual SuperNodes (each serves client ids i %% S)")
    p.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per ClientApp (Ray resources)")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per ClientApp, e.g. 0.5 for two per GPU")
    args, rest = p.parse_known_args(argv)
    if args.supernodes < 1:
        p.error("--supernodes must be at least 1")
    return args, rest


def main(argv=None) -> None:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    runtime.run_main(lambda a: simulate(a, args.supernodes, args.client_cpus, args.client_gpus), rest)


if __name__ == "__main__":  # through the module, so Ray's workers import the apps by name instead of unpickling copies
    import flower_app
    flower_app.main()
