"""A warm SuperExec for a SuperNode: each ClientApp is forked from one process that has already imported torch,
torchaudio and flwr, instead of a new `flwr-clientapp` process that imports them again for every message.

    python -m fedengines.flower_exec --root-certificates ca.crt --auth-supernode-private-key key \\
        --superlink HOST:PORT --port 9094 --node-config 'data-root="/data/site1"'

takes flower-supernode's options and starts that SuperNode (`--isolation process`, its polls at most --poll s apart)
with this process as its SuperExec.

Flower 1.41 runs every message in a new process (`--isolation subprocess`, its default, or `process`, where the
process is ours to start); none lives across messages. On 2 CPU cores a new process paid 2.3 s before our code ran
(importing flwr and torch) and 1.5 s more for torch._dynamo, which torch's optimisers import when the first one is
built (docs/engines.md). A forked child starts with all of that in memory. The child then imports our modules from the
app the server sent (Flower's FAB, as a `flwr-clientapp` would), maps the node's cached samples, trains and exits.

It is Flower's own SuperExec loop (`flower-superexec`) with its executor replaced, so the tasks, tokens and the
ClientApp runtime are Flower's. It leans on flwr 1.41's module layout (pinned in requirements.txt).
"""
from __future__ import annotations

import argparse
import os
import sys


def warm_up() -> None:
    """Import what every ClientApp imports, without running a torch op (the children then start OpenMP afresh)."""
    import importlib
    for name in ("numpy", "PIL.Image", "soundfile", "yaml", "torch", "torch._dynamo", "torchaudio", "flwr.clientapp",
                 "flwr.supernode.runtime.run_clientapp"):  # torch._dynamo: what torch.optim imports on first use
        importlib.import_module(name)


def fork_executor():
    """Flower's subprocess executor, with ClientApp tasks forked from this process."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    class ForkExecutor(SubprocessExecutor):
        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            pid = os.fork()
            if pid:
                return LaunchResult.accepted()
            code = 1
            try:  # the child: Flower's ClientApp runtime, as `flwr-clientapp --token ...` runs it
                from flwr.supernode.runtime.run_clientapp import run_clientapp
                run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                              certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                                  spec.insecure),
                              parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install)
                code = 0
            except SystemExit as e:  # flwr_exit: the child's end, never the SuperExec loop it was forked inside
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

        def reconcile(self):
            try:  # reap finished children
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
    return ForkExecutor()


def run_supernode(argv: list[str], poll: float, heartbeat: float) -> None:
    """Flower's SuperNode (flower-supernode ARGV), its polls at most `poll` s apart (it sleeps 3 s after every empty
    pull from the SuperLink and 0.5 s between looks for a reply: up to 3.5 s of each round's latency), and its
    heartbeat promised every `heartbeat` s (Flower: 30 s; the SuperLink declares a node gone after two missed)."""
    import time as _time
    import flwr.supercore.heartbeat as beat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode
    beat.HEARTBEAT_DEFAULT_INTERVAL = fleet.HEARTBEAT_DEFAULT_INTERVAL = heartbeat

    class _Time:
        def __getattr__(self, name):
            return getattr(_time, name)

        @staticmethod
        def sleep(seconds):
            _time.sleep(min(seconds, poll))
    internal.time = _Time()
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def option(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in flower-supernode's argv (--flag VALUE or --flag=VALUE), or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


INSECURE_WARNING = ("--insecure: this node sends its updates in plaintext and cannot tell the SuperLink from an "
                    "impostor; use it only on a network you trust")


def preflight(argv: list[str]) -> None:
    """What Flower would report late or never, as one line before the node starts: a flag the installed Flower
    lacks, a missing or unreadable key or CA, and a SuperLink that speaks other than this node (TLS vs plaintext, a
    CA that did not sign its certificate, an expired certificate or one for another name)."""
    from fedengines import credentials, flower_cli
    try:
        if os.environ.get(flower_cli.CHECKED) != flower_cli.flower_version():  # else a deployment checked it
            flower_cli.check_flags({("flower-supernode",): flower_cli.USED[("flower-supernode",)]})
        ca, key, link = option(argv, "--root-certificates"), option(argv, "--auth-supernode-private-key"), \
            option(argv, "--superlink")
        if "--insecure" in argv:
            print(f"WARNING {INSECURE_WARNING}", file=sys.stderr)
        elif ca is None:
            raise credentials.CredentialError("give --root-certificates CA_FILE (the ca.crt of the SuperLink's "
                                              "credentials), or --insecure to connect in plaintext")
        if key is not None:
            credentials.check_node_key(key)
        if link is not None:
            credentials.probe_superlink(link, None if "--insecure" in argv else ca)
    except (credentials.CredentialError, flower_cli.FlowerVersionError) as e:
        sys.exit(f"flower_exec: {e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's Runtime API port (flower-supernode --port)")
    p.add_argument("--poll", type=float, default=0.2, help="the SuperNode's polls at most this far apart (Flower: 3 s)")
    p.add_argument("--heartbeat", type=float, default=30.0,
                   help="seconds between the SuperNode's heartbeats (Flower's 30; its SuperLink takes 10 to 1800): "
                        "a node that stops answering is reported after two missed")
    p.add_argument("--supernode-only", action="store_true", help=argparse.SUPPRESS)  # the child this starts
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not 10 <= args.heartbeat <= 1800:  # the range a SuperLink accepts (flwr.common.constant)
        p.error(f"--heartbeat={args.heartbeat:g}: a SuperLink accepts 10 to 1800 s")
    if not args.supernode_only:
        preflight(rest)
    if args.supernode_only:
        return run_supernode([*rest, f"--port={args.port}", "--isolation=process"], args.poll, args.heartbeat)
    import subprocess
    supernode = subprocess.Popen([sys.executable, __file__, "--supernode-only", f"--poll={args.poll}",
                                  f"--heartbeat={args.heartbeat}", *rest, f"--port={args.port}"])
    try:
        warm_up()
        import flwr.supercore.superexec.run_superexec as superexec
        from flwr.supercore.constant import ExecutorType
        superexec.get_executor = lambda *a, **k: fork_executor()
        # the SuperExec talks to this node's own Runtime API (127.0.0.1, plaintext unless the node serves it with
        # --ssl-certfile), not to the SuperLink: its TLS settings are the Runtime API's
        runtime_ca = option(rest, "--ssl-ca-certfile") if option(rest, "--ssl-certfile") else None
        superexec.run_superexec(runtime_api_address=f"127.0.0.1:{args.port}", insecure=runtime_ca is None,
                                root_certificates_path=runtime_ca, parent_pid=supernode.pid,
                                executor_type=ExecutorType.SUBPROCESS)
    finally:
        supernode.terminate()
        supernode.wait()


if __name__ == "__main__":
    main()
