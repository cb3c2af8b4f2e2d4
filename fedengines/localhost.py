"""A Flower deployment on 127.0.0.1 (what deploy.py, tests and scripts/bench_engines.py start): a SuperLink, SuperNodes
(warm ones from fedengines/flower_exec.py, or Flower's own), a `flwr run`, and the clean-up that stops every process they
started, their process groups and every descendant, on every way out."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedengines import credentials, flower_cli

ROOT = Path(__file__).resolve().parents[1]  # the app (pyproject.toml) and its command lines
BIN = Path(sys.executable).parent
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(Exception):
    """deploy.py was told to stop (SIGTERM, SIGHUP, SIGINT): everything it started is stopped on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_handler(signum, frame):
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
    """Servers on 127.0.0.1, each started in its own session and killed with its whole process group on exit.
    Secure unless insecure=True: the SuperLink serves TLS with a certificate of a CA made for this deployment
    (LOGS/credentials, fedengines/credentials.py) and admits only SuperNodes whose keys were registered with it;
    every SuperNode checks the SuperLink's certificate and signs with its own key."""

    def __init__(self, logs: Path, env: dict | None = None, poll_s: float = 0.1, insecure: bool = False):
        self.logs, self.procs = Path(logs), []
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = self.logs / "flwr_home"
        self.insecure = insecure
        self.creds = self.logs / "credentials"
        self.env = {**(env or os.environ), "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(poll_s),  # Flower's default: 1 s between polls
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.nodes: list[subprocess.Popen] = []
        self.node_ids: dict[int, int] = {}  # SuperNode index -> the id the SuperLink registered its key under

    def start(self, cmd: list[str], log: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen([str(c) for c in cmd], cwd=kw.pop("cwd", ROOT), env=self.env, stdout=open(self.logs / log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def __enter__(self) -> "LocalDeployment":
        flower_cli.check_installed()
        self.env[flower_cli.CHECKED] = flower_cli.flower_version()
        self.link = free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        for f in self.logs.glob("superlink.db*"):  # a new SuperLink: no nodes of an earlier deployment
            f.unlink()
        conn = f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.link}"\n'
        cmd = [BIN / "flower-superlink", "--host=127.0.0.1", f"--port={self.link}",
               f"--database={self.logs / 'superlink.db'}"]
        if self.insecure:
            conn += "insecure = true\n"
            cmd.append("--insecure")
        else:  # a new CA and SuperLink certificate for every deployment: no key outlives it
            shutil.rmtree(self.creds, ignore_errors=True)
            made = credentials.make_credentials(self.creds, hosts=["127.0.0.1"])
            crt, key = made["superlink"]
            conn += f'root-certificates = "{made["ca"]}"\n'
            cmd += [f"--ssl-ca-certfile={made['ca']}", f"--ssl-certfile={crt}", f"--ssl-keyfile={key}",
                    "--enable-supernode-auth"]
        (self.home / "config.toml").write_text(conn)
        try:  # a stop (or a SuperLink that never listens) here must not leave the SuperLink behind
            self.start(cmd, "superlink.log", cwd=self.logs)
            wait_listening(self.link, 90, "flower-superlink")
        except BaseException:
            self.__exit__()
            raise
        return self

    def register(self, pub: Path) -> int:
        p = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pub), "local", "--format", "json"],
                           env=self.env, capture_output=True, text=True, timeout=120)
        try:
            return int(json.loads(p.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr supernode register {pub} failed: {(p.stdout + p.stderr).strip()[-500:]}") from None

    def add_node(self, data_root: Path | None = None, warm: bool = True, heartbeat: float = 30.0,
                 wait: bool = True, enrolled: bool = True) -> subprocess.Popen:
        """A SuperNode (with its own data when data_root is given): warm, fedengines/flower_exec.py's (ClientApps
        forked from a process that has imported torch; polls 0.2 s apart); else Flower's own (a new process a
        message). Secure deployments give it a key of its own, registered unless enrolled=False (a stranger, which
        the SuperLink must refuse). wait=False: return once started (a run's min-nodes waits for it to connect)."""
        i, port = len(self.nodes), free_port()
        cmd = [sys.executable, "-m", "fedengines.flower_exec", f"--heartbeat={heartbeat}"] if warm else [BIN / "flower-supernode"]
        if self.insecure:
            cmd.append("--insecure")
        else:
            key, pub = credentials.make_credentials(self.creds, names=[f"node{i}"])["nodes"][f"node{i}"]
            if enrolled:
                self.node_ids[i] = self.register(pub)
            cmd += [f"--root-certificates={self.creds / 'ca.crt'}", f"--auth-supernode-private-key={key}"]
        cmd += [f"--superlink=127.0.0.1:{self.link}", f"--port={port}"]
        cmd += ["--node-config", f'data-root="{Path(data_root).resolve()}"'] if data_root is not None else []
        node = self.start(cmd, f"supernode{i}.log", cwd=self.logs)
        if wait:
            wait_listening(port, 90, f"SuperNode {i}")
        self.nodes.append(node)
        return node

    def refused(self) -> int:
        """How many distinct SuperNode keys the SuperLink refused so far (not registered, or no key at all), from its
        log: Flower logs each refusal as an ApiError 2001 (registration through the Fleet API, which node
        authentication disables) or 2004 (activation of a key it does not know)."""
        try:
            text = (self.logs / "superlink.log").read_text(errors="replace")
        except OSError:
            return 0
        return len(set(re.findall(r"ApiError:200[14]\] Attempted to register SuperNode with public key: (b'[^']*')", text)))

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
