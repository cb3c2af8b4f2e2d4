"""A Flower deployment on this machine: a SuperLink and one SuperNode per data folder, all on 127.0.0.1, then a
node-local `flwr run` of a pretraining config; every server is stopped at the end (also on Ctrl-C or an error).

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
        self.start([BIN / "flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={self.link}",
                    f"--database={self.logs / 'superlink.db'}"], "superlink.log", cwd=self.logs)
        wait_listening(self.link, 90, "flower-superlink")
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
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def parse_args(argv):
    """(deploy.py's options, pretrain.py's config overrides)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a pretraining config (configs/...)")
    p.add_argument("--node-data", nargs="+", required=True, metavar="DIR", help="one SuperNode per data folder")
    p.add_argument("--cold", action="store_true", help="Flower's own SuperExec: a new process per message")
    p.add_argument("--no-eval-data", action="store_true", help="the server reads no data (no kNN monitor, no probe)")
    p.add_argument("--resume", action="store_true", help="continue run.out_dir from its last.pt")
    return p.parse_known_args(argv)


def main(argv=None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from nodes import load_node_local_config
    out = Path(load_node_local_config(args.config, overrides).run.out_dir).resolve()
    overrides = [o for o in overrides if not o.startswith("--run.out_dir=")] + [f"--run.out_dir={out}"]
    with LocalDeployment(out / "deployment") as d:
        for root in args.node_data:
            d.add_node(Path(root), warm=not args.cold)
        run = d.run(Path(args.config).resolve(), overrides, mode="node-local", resume=args.resume,
                    **{"min-nodes": len(args.node_data), "eval-data": not args.no_eval_data})
        log = d.logs / "flwr_run.log"
        with open(log) as f:
            while run.poll() is None:
                sys.stdout.write(f.read())
                time.sleep(0.5)
            sys.stdout.write(f.read())
    if run.returncode:
        sys.exit(f"flwr run exited {run.returncode}: see {d.logs}")


if __name__ == "__main__":
    main()
