"""The Flower command lines this package starts, and the flags it gives each: checked against the installed Flower
before anything starts, because several were renamed between releases (a renamed TLS flag would otherwise surface
as a SuperLink that exits, or a node that retries forever)."""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent

# command -> the flags deploy.py, fedengines/localhost.py and fedengines/flower_exec.py pass it
USED = {
    ("flower-superlink",): ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                            "--insecure", "--host", "--port", "--database"),
    ("flower-supernode",): ("--root-certificates", "--auth-supernode-private-key", "--insecure", "--superlink",
                            "--port", "--node-config", "--isolation"),
    ("flwr", "supernode", "register"): ("--format",),
}


CHECKED = "FSSUAVL_FLOWER_CHECKED"  # set to the version by a process that checked it, for the processes it starts


class FlowerVersionError(Exception):
    """The installed Flower lacks a flag this package uses."""


def flower_version() -> str:
    try:
        from importlib.metadata import version
        return version("flwr")
    except Exception:  # noqa: BLE001 - not installed at all: say so below
        return "not installed"


def help_text(cmd: tuple[str, ...]) -> str:
    exe = BIN / cmd[0]
    try:
        p = subprocess.run([str(exe if exe.exists() else cmd[0]), *cmd[1:], "--help"], capture_output=True,
                           text=True, timeout=120, env={"COLUMNS": "200", "PATH": str(BIN), "NO_COLOR": "1"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FlowerVersionError(f"flwr {flower_version()}: `{' '.join(cmd)} --help` could not run ({e}): install "
                                 f"the flwr of requirements.txt (bash setup.sh env)") from e
    return re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)


@functools.cache
def check_installed() -> None:
    """check_flags() of everything USED, once a process."""
    check_flags(USED)


def check_flags(commands=None) -> None:
    """Stop with one line naming the Flower version, the command and the first flag it lacks."""
    from concurrent.futures import ThreadPoolExecutor
    commands = commands or USED
    with ThreadPoolExecutor(len(commands)) as pool:  # each --help imports flwr: about 2 s, in parallel
        texts = dict(zip(commands, pool.map(help_text, commands)))
    for cmd, flags in commands.items():
        text = texts[cmd]
        for flag in flags:
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                raise FlowerVersionError(f"flwr {flower_version()}: `{' '.join(cmd)}` has no {flag}, which this package "
                                         f"passes it: install the flwr of requirements.txt (bash setup.sh env)")
