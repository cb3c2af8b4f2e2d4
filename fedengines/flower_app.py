"""The Flower engine: our federation as a Flower App (a ServerApp and a ClientApp on flwr's Message API).

    python -m fedengines.flower_app CONFIG [--key=value ...] [--resume] [--supernodes 2]   # Flower's Simulation Engine
    flwr run . CONNECTION --run-config "config='CONFIG' overrides='--key=value ...' [mode='node-local']"   # a SuperLink

The ServerApp is `pretrain.py`'s run (pretraining.cli) with a Flower engine: it samples clients with our
sample_clients(seed, round), sends each sampled client's node the global state (one array: `pack`) with the client
id, the round, its learning rate (the ClientApp checks it against its own schedule) and the run's config, folds the
replies with our strategy in client order (per-modality sample counts travel in the reply's metrics, so
fed.weighting=modality works), and writes config.yaml, log.jsonl and last.pt exactly as pretrain.py does, so
finetune.py and paper_tables.py read a Flower run unchanged and --resume continues one. The ClientApp trains with
`engine.Clients.update`, the client function of every engine. Two modes (run config `mode`):
- partitioned: every node holds the config's dataset and the server's partition; client i goes to the i % S-th of
  S SuperNodes (ids sorted); on the same config and seed the global weights equal the in-process run's;
- node-local: each SuperNode trains on its own files (fedengines/nodes.py; `--node-config 'data-root="..."'`); `enlist` asks
  the nodes what they hold before round 1, and client i is the i-th accepted node.
docs/engines.md has the commands; fedengines/flower_exec.py is a warm SuperNode, deploy.py a localhost deployment.
"""
from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedengines import nodes as nodes_mod
import pretraining
import runtime
from engine import Clients, PretrainConfig
from federation import ClientUpdate
from local_update import lr_at
from modality_specs import MODALITIES
from settings import ConfigError, UserError, build_dataclass, to_dict

ROOT = Path(__file__).resolve().parents[1]  # the app: pyproject.toml, configs/, the method's modules


def pack(state: dict) -> ArrayRecord:
    """A state dict as one Array of bytes (torch.save's): Flower moves each array of a message as an object of its
    own, with a request each way per object and hop, so a model's hundred-odd tensors cost seconds a message; one
    array costs one. Exact: the bytes are the tensors'."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return ArrayRecord({"state": Array(np.frombuffer(buf.getbuffer(), dtype=np.uint8).copy())})


def unpack(record: ArrayRecord, device) -> dict:
    raw = record["state"].numpy().tobytes()
    return {k: v.to(device) for k, v in torch.load(io.BytesIO(raw), weights_only=True).items()}


class FlowerError(UserError):
    """A Flower run could not go on (no SuperNodes, a ClientApp failed, a reply went missing)."""


def wait_for_nodes(grid: Grid, min_nodes: int, wait_s: float = 120.0) -> list[int]:
    """The connected SuperNodes' ids, sorted, once at least min_nodes are connected."""
    t0 = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() - t0 > wait_s:
            raise FlowerError(f"{len(nodes)} SuperNodes connected after {wait_s:.0f} s, {min_nodes} wanted "
                              f"(run config min-nodes): start them, or lower min-nodes")
        time.sleep(1.0)
    return nodes


def exchange(grid: Grid, msgs: list, keys: list, timeout: float, poll: float = 0.2) -> tuple[dict, dict, list]:
    """Send msgs (keys[i] names msgs[i]) and collect the replies: ({key: reply}, {key: Error}, [keys with no reply
    within timeout]). Polls every `poll` s: Grid.send_and_receive waits 3 s between polls, a second or more a round."""
    ids = list(grid.push_messages(msgs))
    key_of = dict(zip(ids, keys))
    replies, errors, t0 = {}, {}, time.monotonic()
    while len(replies) + len(errors) < len(ids) and (not timeout or time.monotonic() - t0 < timeout):
        for rep in grid.pull_messages([i for i in ids if key_of[i] not in replies and key_of[i] not in errors]):
            k = key_of[rep.metadata.reply_to_message_id]
            if rep.has_error():
                errors[k] = rep.error
            else:
                replies[k] = rep
        time.sleep(poll)
    return replies, errors, [k for k in keys if k not in replies and k not in errors]


def _unavailable(err) -> bool:
    return "Node Unavailable" in err.reason or "Message Unavailable" in err.reason


class FlowerEngine:
    """The Flower engine (engine.Engine) on a Flower Grid, driven by pretraining.Pretraining like engine.InProcess.
    mode "partitioned": client i (of the config's partition) goes to the (i mod S)-th of S SuperNodes; "node-local":
    client i is the SuperNode nodes[i], which trains on its own data."""
    main = True

    def __init__(self, grid: Grid, clients: "Clients", min_nodes: int = 1, wait_s: float = 120.0,
                 nodes: list[int] | None = None, mode: str = "partitioned", timeout: float = 0.0, map_data: bool = False):
        cfg = clients.cfg
        if not cfg.fed.share_head:
            raise ConfigError("fed.share_head=false keeps each client's head on the client between rounds, "
                                      "which the Flower engine does not do (a SuperNode serves many client ids); "
                                      "run it in process or under torchrun")
        self.grid, self.c, self.mode, self.timeout, self.map_data = grid, clients, mode, timeout, map_data
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        self.nodes = nodes or wait_for_nodes(grid, min_nodes, wait_s)

    def node_of(self, cid: int) -> int:
        return self.nodes[cid % len(self.nodes)]

    def round(self, r, active, global_state, client_state, should_stop):
        t0 = time.monotonic()
        arrays = pack(global_state)
        msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {"client": cid, "round": r, "lr": lr_at(r, self.c.cfg.optim, self.c.cfg.fed.rounds),
                     "config": self.config_yaml, "mode": self.mode, "map-data": self.map_data})}),
                    dst_node_id=self.node_of(cid), message_type="train", group_id=str(r))
                for cid in active]
        replies, errors, late = exchange(self.grid, msgs, list(active), self.timeout)
        lost = sorted(c for c, e in errors.items() if _unavailable(e)) + late
        if lost:  # the run stops: a redone round would sample other clients than the seed's, changing the run
            raise FlowerError(f"round {r}: SuperNode{'s' if len(lost) > 1 else ''} "
                              f"{', '.join(str(self.node_of(c)) for c in lost)} (client{'s' if len(lost) > 1 else ''} "
                              f"{', '.join(map(str, lost))}) {'disconnected' if not late else 'sent no reply'} mid-round; "
                              f"{self.c.cfg.run.out_dir}/last.pt holds round {r - 1}: start the node again and resume "
                              f"with run config resume=true")
        if errors:
            cid, err = min(errors.items())
            raise FlowerError(f"round {r}: the ClientApp of client {cid} on SuperNode {self.node_of(cid)} failed "
                              f"({err.code}): {err.reason}")
        updates = {}
        for rep in replies.values():
            m = dict(rep.content["metrics"])
            cid = int(m.pop("client"))
            samples = {mod: int(m.pop(f"n_{mod}")) for mod in MODALITIES if f"n_{mod}" in m}
            state = unpack(rep.content["arrays"], self.c.device)
            updates[cid] = ClientUpdate(cid, state, samples, m)
        by_node: dict[int, dict] = {}
        for cid, u in sorted(updates.items()):
            n = by_node.setdefault(self.node_of(cid), {})
            for m, k in u.samples.items():
                n[m] = n.get(m, 0) + k
        times = {k: sum(u.metrics.get(f"t_{k}", 0.0) for u in updates.values()) / max(1, len(updates))
                 for k in ("start", "data", "train")}
        tqdm.write(f"round {r}: {len(updates)} clients on {len(by_node)} SuperNodes in {time.monotonic() - t0:.1f} s: "
                   + "; ".join(f"node {node}: " + ", ".join(f"{k} {m}" for m, k in n.items()) for node, n in by_node.items())
                   + f" (a ClientApp's mean: start {times['start']:.1f} s, data {times['data']:.1f} s, "
                     f"train {times['train']:.1f} s)")
        return updates.pop

    def stop_requested(self, local: bool) -> bool:
        return local

    def close(self):
        pass


# ----------------------------------------------------------------------------- the ServerApp

MODES = ("partitioned", "node-local")


def enlist(grid: Grid, argv: list, min_nodes: int, timeout: float) -> tuple[list[int], list[dict], list[str]]:
    """node-local: ask every connected SuperNode what it holds (it decodes its files to the config's inputs on the
    way). A node that cannot train is refused with a line naming it and left out. Returns the accepted nodes
    (sorted ids: client i is nodes[i]), what each holds, and the overrides that size the federation to them."""
    args, overrides = pretraining.parse_args(argv)
    cfg = nodes_mod.load_node_local_config(args.config or pretraining.DEFAULT_CONFIG, overrides)
    found = wait_for_nodes(grid, min_nodes)
    conf = ConfigRecord({"config": yaml.safe_dump(to_dict(cfg), sort_keys=False)})
    msgs = [Message(RecordDict({"config": conf}), dst_node_id=n, message_type="query") for n in found]
    replies, errors, late = exchange(grid, msgs, found, timeout)
    nodes, counts = [], []
    for n in found:
        c = dict(replies[n].content["config"]) if n in replies else {}
        err = errors.get(n)
        if n in late:
            why = f"no reply within round-timeout={timeout:g} s"
        elif err is not None:
            why = ("not reachable (gone, or not yet timed out on the SuperLink)" if _unavailable(err)
                   else f"its ClientApp failed: {err.reason}")
        else:
            why = c.get("refused", "")
        if why:
            print(f"SuperNode {n}: refused: {why}")
            continue
        nodes.append(n)
        counts.append({m: int(c[f"n_{m}"]) for m in MODALITIES if f"n_{m}" in c})
        print(f"SuperNode {n}: {c.get('root', '?')}: " + ", ".join(f"{k} {m}" for m, k in counts[-1].items()))
    if not nodes:
        raise FlowerError(f"none of the {len(found)} SuperNodes can train (see the lines above): nothing to federate")
    k = min(cfg.fed.clients_per_round, len(nodes))
    print(f"federation: {len(nodes)} SuperNodes with their own data, {k} sampled a round")
    return nodes, counts, [f"--fed.clients={len(nodes)}", f"--fed.clients_per_round={k}"]


server_app = ServerApp()
_SIM = {}  # python -m fedengines.flower_app: the argv for the ServerApp, and what it raised (it runs in a thread)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    mode, timeout, make_clients = str(rc.get("mode", "partitioned")), float(rc.get("round-timeout", 0)), None
    if "argv" in _SIM:
        argv, min_nodes = _SIM["argv"], 1
    else:  # flwr run: the run config of pyproject.toml, overridden with --run-config
        config = Path(str(rc.get("config", "configs/default.yaml")))  # a relative path: one of the app's configs
        argv = [str(config if config.is_absolute() else ROOT / config)] + shlex.split(str(rc.get("overrides", "")))
        argv += ["--resume"] if rc.get("resume", False) else []
        min_nodes = int(rc.get("min-nodes", 1))
    nodes = None
    try:
        if mode not in MODES:
            raise ConfigError(f"run config mode={mode!r}: expected one of {', '.join(MODES)}")
        if mode == "node-local":
            nodes, counts, extra = enlist(grid, argv, min_nodes, timeout)
            argv += extra
            make_clients = lambda cfg, device, progress: nodes_mod.NodeFederation(  # noqa: E731
                cfg, device, counts, evaluate=bool(rc.get("eval-data", True)), progress=progress)
        deployed = "argv" not in _SIM  # a deployment's ClientApp lives for one message: it maps the dataset
        pretraining.cli(argv, make_engine=lambda clients: FlowerEngine(grid, clients, min_nodes, nodes=nodes, mode=mode,
                                                                       timeout=timeout, map_data=deployed),
                        make_clients=make_clients)
    except BaseException as e:  # noqa: BLE001  (handed to the caller of the simulation, then re-raised)
        _SIM["error"] = e
        raise


# ----------------------------------------------------------------------------- the ClientApp

client_app = ClientApp()
_CLIENTS: dict[tuple, "Clients"] = {}  # one per config (and data root) this process serves: the data load once


def _clients_for(config_yaml: str, root: Path | None = None, mapped: bool = False) -> "Clients":
    """This process's client runtime: the config's dataset and partition, or (root given) the node's own data.
    mapped: the dataset in the disk tier (memory-mapped, its log-mels computed once a machine and kept), for a
    ClientApp that lives for one message; the same bits as any tier."""
    if (config_yaml, root, mapped) not in _CLIENTS:
        _CLIENTS.clear()  # a new run: let the last one's data go
        cfg = build_dataclass(PretrainConfig, yaml.safe_load(config_yaml))
        if mapped and root is None:  # (a node's own samples are mapped from its cache already)
            cfg.data.residency = "disk"
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        device = runtime.resolve_device(cfg.run.device)
        runtime.seed_everything(cfg.run.seed, cfg.run.deterministic, device, cfg.run.compile)
        _CLIENTS[config_yaml, root, mapped] = nodes_mod.node_clients(cfg, root, device) if root else Clients(cfg, device)
    return _CLIENTS[config_yaml, root, mapped]


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): what a ClientApp paid before our code ran."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    """node-local: what this SuperNode holds for the run (its files decoded to the config's inputs on the way),
    or why it cannot train."""
    try:
        root = nodes_mod.node_root(context.node_config)
        data = _clients_for(str(msg.content["config"]["config"]), root).data
        reply = {"root": str(root), **{f"n_{m}": len(md.train_x) for m, md in data.items()}}
    except UserError as e:
        reply = {"refused": str(e)}
    return Message(RecordDict({"config": ConfigRecord(reply)}), reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    t_start, t0 = _process_age(), time.monotonic()
    conf = msg.content["config"]
    local = str(conf.get("mode", "partitioned")) == "node-local"
    clients = _clients_for(str(conf["config"]), nodes_mod.node_root(context.node_config) if local else None,
                           bool(conf.get("map-data", False)))
    t_data, t0 = time.monotonic() - t0, time.monotonic()
    cid, r = int(conf["client"]), int(conf["round"])
    lr = lr_at(r, clients.cfg.optim, clients.cfg.fed.rounds)
    if float(conf["lr"]) != lr:  # the same config on both sides gives the same schedule; anything else is drift
        raise FlowerError(f"round {r}: the server sent lr {conf['lr']} but this ClientApp's config gives {lr}")
    state = unpack(msg.content["arrays"], clients.device)
    upd = clients.update(state, 0, r, draw_as=cid) if local else clients.update(state, cid, r)
    shared = {k: v.detach().cpu() for k, v in upd.state.items() if clients.share(k)}
    metrics = {"client": cid, **{f"n_{m}": n for m, n in upd.samples.items()}, "t_start": t_start, "t_data": t_data,
               "t_train": time.monotonic() - t0,
               **{k: v for k, v in upd.metrics.items() if isinstance(v, (int, float))}}
    return Message(RecordDict({"arrays": pack(shared), "metrics": MetricRecord(metrics)}), reply_to=msg)


# -------------------------------------------------------------------- python -m fedengines.flower_app: simulation

def simulate(argv, supernodes: int = 2, client_cpus: float = 1.0, client_gpus: float = 0.0) -> None:
    """Run pretrain.py's federation (argv as for pretrain.py) under Flower's Simulation Engine with
    `supernodes` virtual SuperNodes, each ClientApp given client_cpus CPUs and client_gpus GPUs."""
    from flwr.simulation import run_simulation
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    _SIM.clear()
    _SIM["argv"] = list(argv)
    resources = {"num_cpus": client_cpus, "num_gpus": client_gpus}
    os.environ["FSSUAVL_LAUNCHER"] = f"python -m fedengines.flower_app --supernodes {supernodes}"  # the resume advice
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
    from fedengines import flower_app
    flower_app.main()
