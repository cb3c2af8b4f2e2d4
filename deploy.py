"""A Flower deployment on this machine: a SuperLink and one SuperNode per data folder, all on 127.0.0.1, then a
node-local `flwr run` of a pretraining config; every process it started is stopped at the end, also on an error or
on SIGTERM, SIGHUP or Ctrl-C (it then says which round last.pt holds and how to resume).

    python deploy.py CONFIG --node-data site1 site2 site3 [--cold] [--key=value ...]
    python deploy.py CONFIG --node-data site1 site2 --resume --run.out_dir=runs/x     # continue a stopped run

It is the README's by-hand deployment in one command: for trying a federation of folders before the machines are
real, and what tests/test_deployment.py and bench_engines.py run. Each SuperNode gets `--node-config
data-root="DIR"` and, unless --cold, the warm SuperExec of flower_exec.py (`--isolation process`). Logs go to
RUN_DIR/deployment/. On real machines run the same pieces by hand (docs/engines.md).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(Exception):
    """deploy.py was told to stop (SIGTERM, SIGHUP, SIGINT): everything it started is stopped on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def process_tree(roots: list[int]) -> list[int]:
    """The pids of `roots` and of all their descendants, read from /proc: Flower starts its SuperExec (and through it
    the ServerApp) in a session of its own, out of reach of its parent's process group."""
    children: dict[int, list[int]] = {}
    for d in (os.listdir("/proc") if os.path.isdir("/proc") else []):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.2)


class LocalDeployment:
    """Servers on 127.0.0.1, each started in its own session and killed with its whole process group on exit."""

    def __init__(self, logs: Path, env: dict | None = None, poll_s: float = 0.1):
        self.logs, self.procs = Path(logs), []
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = self.logs / "flwr_home"
        self.env = {**(env or os.environ), "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(poll_s)}  # Flower's default: 1 s between polls
        self.nodes: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen([str(c) for c in cmd], cwd=kw.pop("cwd", ROOT), env=self.env, stdout=open(self.logs / log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def __enter__(self) -> "LocalDeployment":
        self.link = free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        for f in self.logs.glob("superlink.db*"):  # a new SuperLink: no nodes of an earlier deployment
            f.unlink()
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                               f'address = "127.0.0.1:{self.link}"\ninsecure = true\n')
        try:  # a stop (or a SuperLink that never listens) here must not leave the SuperLink behind
            self.start([BIN / "flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={self.link}",
                        f"--database={self.logs / 'superlink.db'}"], "superlink.log", cwd=self.logs)
            wait_listening(self.link, 90, "flower-superlink")
        except BaseException:
            self.__exit__()
            raise
        return self

    def add_node(self, data_root: Path | None = None, warm: bool = True, heartbeat: float = 30.0,
                 wait: bool = True) -> subprocess.Popen:
        """A SuperNode (with its own data when data_root is given): warm, flower_exec.py's (ClientApps forked from
        a process that has imported torch; polls 0.2 s apart); else Flower's own (a new process a message).
        wait=False: return once started (a run's min-nodes waits for it to connect)."""
        i, port = len(self.nodes), free_port()
        cmd = [sys.executable, ROOT / "flower_exec.py", f"--heartbeat={heartbeat}"] if warm else [BIN / "flower-supernode"]
        cmd += ["--insecure", f"--superlink=127.0.0.1:{self.link}", f"--port={port}"]
        cmd += ["--node-config", f'data-root="{Path(data_root).resolve()}"'] if data_root is not None else []
        node = self.start(cmd, f"supernode{i}.log", cwd=self.logs)
        if wait:
            wait_listening(port, 90, f"SuperNode {i}")
        self.nodes.append(node)
        return node

    def stop_node(self, i: int, sig=signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nodes[i].pid, sig)

    def run(self, config, overrides: list[str], log: str = "flwr_run.log", **run_config) -> subprocess.Popen:
        """`flwr run` of this app on the SuperLink, streaming the ServerApp's output to LOGS/log."""
        rc = {"config": str(config), "overrides": " ".join(shlex.quote(o) for o in overrides), **run_config}
        text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}" for k, v in rc.items())
        return self.start([BIN / "flwr", "run", ROOT, "local", "--stream", "--run-config", text], log)

    def __exit__(self, *exc) -> None:
        """Kill every process started here, their groups and every descendant (taken before any is killed, while
        the tree still links them), with the stop signals held back until it is done."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for _ in range(2):  # a second pass for anything started while the first was killing
                tree = process_tree([p.pid for p in self.procs])
                for p in self.procs:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                for pid in tree:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            for p in self.procs:
                p.wait()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def parse_args(argv):
    """(deploy.py's options, pretrain.py's config overrides)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a pretraining config (configs/...)")
    p.add_argument("--node-data", nargs="+", required=True, metavar="DIR", help="one SuperNode per data folder")
    p.add_argument("--cold", action="store_true", help="Flower's own SuperExec: a new process per message")
    p.add_argument("--no-eval-data", action="store_true", help="the server reads no data (no kNN monitor, no probe)")
    p.add_argument("--resume", action="store_true", help="continue run.out_dir from its last.pt")
    return p.parse_known_args(argv)


def where_it_stands(out: Path, argv: list[str]) -> str:
    """The round the run's last.pt holds and the command that continues it."""
    from checkpoints import CheckpointError, load_latest_checkpoint
    try:
        found = load_latest_checkpoint(out, warn=lambda line: None)
    except CheckpointError as e:
        return f"{out}: {e}"
    if found is None:
        return f"{out} holds no checkpoint yet: run the same command again to start over"
    again = [a for a in argv if a != "--resume"] + ["--resume"]
    return f"{found[1]} holds round {found[0]['round']}. Resume with: python deploy.py {shlex.join(again)}"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    from nodes import load_node_local_config
    out = Path(load_node_local_config(args.config, overrides).run.out_dir).resolve()
    overrides = [o for o in overrides if not o.startswith("--run.out_dir=")] + [f"--run.out_dir={out}"]
    old = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        with LocalDeployment(out / "deployment") as d:
            for root in args.node_data:
                d.add_node(Path(root), warm=not args.cold)
            run = d.run(Path(args.config).resolve(), overrides, mode="node-local", resume=args.resume,
                        **{"min-nodes": len(args.node_data), "eval-data": not args.no_eval_data})
            log = d.logs / "flwr_run.log"
            with open(log) as f:
                while run.poll() is None:
                    sys.stdout.write(f.read())
                    sys.stdout.flush()
                    time.sleep(0.5)
                sys.stdout.write(f.read())
    except Stopped as e:  # the deployment's every process is gone by now (LocalDeployment.__exit__)
        print(f"\n{e}: stopped the SuperLink, {len(args.node_data)} SuperNodes and the run; "
              f"{where_it_stands(out, argv)}", file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if run.returncode:
        sys.exit(f"flwr run exited {run.returncode}: see {d.logs}")


if __name__ == "__main__":
    main()
