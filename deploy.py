"""A Flower deployment on this machine: a SuperLink and one SuperNode per data folder, all on 127.0.0.1, then a
node-local `flwr run` of a pretraining config; every process it started is stopped at the end, also on an error or
on SIGTERM, SIGHUP or Ctrl-C (it then says which round last.pt holds and how to resume).

    python deploy.py CONFIG --node-data site1 site2 site3 [--cold] [--key=value ...]
    python deploy.py CONFIG --node-data site1 site2 --resume --run.out_dir=runs/x     # continue a stopped run
    python deploy.py certs OUT --host superlink.example.org --nodes 3     # credentials for real sites (docs/engines.md)

Secure by default: the SuperLink serves TLS with a certificate of a CA made for this deployment and admits only the
SuperNodes whose keys it registered (one key pair per node, made and enrolled here; RUN_DIR/deployment/credentials).
--insecure (plaintext, any node admitted) only when asked, with a warning.

It is the README's by-hand deployment in one command: for trying a federation of folders before the machines are
real, and what tests/test_deployment.py and scripts/bench_engines.py run. Each SuperNode gets `--node-config
data-root="DIR"` and, unless --cold, the warm SuperExec of fedengines/flower_exec.py (`--isolation process`). Logs go to
RUN_DIR/deployment/. On real machines run the same pieces by hand (docs/engines.md).
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

from fedengines import credentials, flower_cli
from fedengines.localhost import STOP_SIGNALS, LocalDeployment, Stopped, stop_handler
from settings import int_at_least


INSECURE_WARNING = ("WARNING --insecure: the SuperLink admits any SuperNode that reaches its port and the weights "
                    "cross the network in plaintext; without it the deployment uses TLS and enrolled node keys")


def parse_certs_args(argv):
    p = argparse.ArgumentParser(prog="deploy.py certs", description=credentials.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a new folder (or one made by `certs` already, with --add-nodes)")
    p.add_argument("--host", nargs="+", default=[], metavar="NAME_OR_IP",
                   help="every name and address the SuperNodes reach the SuperLink at (its certificate's SANs)")
    p.add_argument("--nodes", type=int_at_least(0), default=0, help="key pairs for this many sites: site0, site1, ...")
    p.add_argument("--names", nargs="+", default=[], metavar="NAME", help="key pairs for the sites named so")
    p.add_argument("--add-nodes", type=int_at_least(1), default=0, metavar="N",
                   help="N more sites under the CA already in OUT")
    p.add_argument("--days", type=int_at_least(1), default=365, help="validity of the CA and the SuperLink's certificate")
    p.add_argument("--check", action="store_true",
                   help="write nothing: check OUT's files (valid now, signed by its CA, naming every --host; each "
                        "site's key private and of the right kind), as the SuperLink's and the sites' machines need")
    return p.parse_args(argv)


def certs(argv) -> None:
    a = parse_certs_args(argv)
    out = Path(a.out)
    try:
        if a.check:
            credentials.check_server_files(out / "ca.crt", out / "superlink" / "server.crt",
                                           out / "superlink" / "server.key", a.host)
            for name in credentials.node_names(out):
                credentials.check_node_key(out / "supernodes" / name / "key")
            print(f"{out}: the SuperLink's files and {len(credentials.node_names(out))} site key(s) check out")
            return
        made = credentials.make_credentials(a.out, a.host, a.nodes + a.add_nodes, a.names, a.days)
    except credentials.CredentialError as e:
        sys.exit(f"deploy.py certs: {e}")
    if made["superlink"]:
        print(f"CA              {made['ca']} (public: every machine) and {out / 'ca.key'} (signs only: keep offline)")
        print(f"SuperLink       {made['superlink'][0].parent}/ (server.crt, server.key): the SuperLink's machine only")
    for name, (key, pub) in made["nodes"].items():
        print(f"site {name:<10} {key} (that site only) + {out / 'ca.crt'}; enrol with: flwr supernode register {pub}")


def parse_args(argv):
    """(deploy.py's options, pretrain.py's config overrides)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a pretraining config (configs/...)")
    p.add_argument("--node-data", nargs="+", required=True, metavar="DIR", help="one SuperNode per data folder")
    p.add_argument("--cold", action="store_true", help="Flower's own SuperExec: a new process per message")
    p.add_argument("--no-eval-data", action="store_true", help="the server reads no data (no kNN monitor, no probe)")
    p.add_argument("--resume", action="store_true", help="continue run.out_dir from its last.pt")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, and every node that reaches the SuperLink admitted (default: TLS + enrolled keys)")
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
    if argv[:1] == ["certs"]:
        return certs(argv[1:])
    args, overrides = parse_args(argv)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    from fedengines.nodes import load_node_local_config
    out = Path(load_node_local_config(args.config, overrides).run.out_dir).resolve()
    overrides = [o for o in overrides if not o.startswith("--run.out_dir=")] + [f"--run.out_dir={out}"]
    old = {s: signal.signal(s, stop_handler) for s in STOP_SIGNALS}
    try:
        with LocalDeployment(out / "deployment", insecure=args.insecure) as d:
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
            refused = d.refused()
            if refused:
                print(f"the SuperLink refused {refused} SuperNode key(s) it has not enrolled: see "
                      f"{d.logs / 'superlink.log'}", file=sys.stderr)
    except (credentials.CredentialError, flower_cli.FlowerVersionError) as e:
        sys.exit(f"deploy.py: {e}")
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
