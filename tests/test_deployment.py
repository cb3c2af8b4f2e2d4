"""Flower deployments on localhost (fedengines.localhost.LocalDeployment), secure as deployed: TLS with a CA made for
the deployment and node authentication. A SuperLink and four enrolled SuperNodes, three with their own folder (images
only, audio only, both) and one with an empty one; three run fedengines/flower_exec.py's warm SuperExec, the empty one
Flower's own; and a fifth, a stranger with data and a key the SuperLink never registered. On it: a partitioned run
(the same bits as in process), then a node-local run (the server holds no training data) in which a node is stopped
mid-round; the stranger is refused and never trains; nodes with the wrong CA, in plaintext or without their key stop
with one line. Every server listens on 127.0.0.1 and is killed (its whole process group) when the module's tests
end, passed or failed."""
import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

import finetune
from fedengines.localhost import LocalDeployment
from helpers import ENV, TINY_DATA, _args, _same
from fedengines.nodes import load_node_local_config, write_demo_node

pytestmark = pytest.mark.slow

NODE_LOCAL = ["--optim.batch_size=32", "--run.threads=1", "--run.progress=false", "--run.final_probe=false",
              "--run.eval_every=0", "--fed.clients_per_round=3", *TINY_DATA]
HOLDS = ("64 image", "48 audio", "40 image, 40 audio")


def _wait_for(path: Path, pattern: str, logs: Path, timeout: float, proc=None) -> re.Match:
    """The first match of `pattern` in the file `path`, waiting up to `timeout` s (the servers' logs on failure)."""
    t0 = time.monotonic()
    while not (m := re.search(pattern, path.read_text() if path.exists() else "")):
        report = "\n".join(f"== {f.name}\n{f.read_text()[-2500:]}" for f in sorted(logs.glob("*.log")))
        assert time.monotonic() - t0 < timeout, f"no {pattern!r} in {path.name} after {timeout:.0f} s\n{report}"
        assert proc is None or proc.poll() in (None, 0), report
        time.sleep(0.3)
    return m


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("deployment")
    data = load_node_local_config("configs/smoke.yaml", TINY_DATA).data
    roots = [write_demo_node(tmp / "site_images", data, images=64, seed=1),
             write_demo_node(tmp / "site_audio", data, clips=48, seed=2),
             write_demo_node(tmp / "site_both", data, images=40, clips=40, seed=3)]
    (tmp / "site_empty" / "images").mkdir(parents=True)
    roots.append(tmp / "site_empty")
    with LocalDeployment(tmp / "logs", env={**ENV}) as d:
        for i, root in enumerate(roots):
            d.add_node(root, warm=i < 3, heartbeat=10, wait=False)  # a stopped node is reported within 2 x 10 s
        d.add_node(roots[2], warm=True, heartbeat=10, wait=False, enrolled=False)  # a stranger: a key, not enrolled
        d.roots, d.tmp = roots, tmp
        yield d


def _finish(run, timeout=60):
    t0 = time.monotonic()
    while run.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.3)


def test_a_partitioned_deployment_equals_in_process(deployment, reference, cache_dir):
    out = deployment.tmp / "partitioned"
    run = deployment.run("configs/smoke.yaml", _args(out, cache_dir)[1:], "partitioned.log", **{"min-nodes": 4})
    _wait_for(deployment.logs / "partitioned.log", r"round 2: 3 clients on \d SuperNodes", deployment.logs, 300, run)
    _finish(run)
    _same(reference, out)


def test_supernodes_train_on_their_own_folders_and_one_stopped_mid_round_is_named(deployment, cache_dir):
    """Node-local: an empty folder is refused with a line naming it, the three others train on what they hold, each
    round says which nodes trained on what; a node stopped mid-round is named, the run stops with its last round
    saved, and finetune.py evaluates that last.pt like any other (the server never read the nodes' files)."""
    d, out = deployment, deployment.tmp / "node_local"
    run = d.run("configs/smoke.yaml", [*NODE_LOCAL, "--fed.rounds=50", f"--data.cache_dir={cache_dir}",
                                       f"--run.out_dir={out}"], "node_local.log", mode="node-local", **{"min-nodes": 4})
    log = d.logs / "node_local.log"
    _wait_for(log, rf"SuperNode \d+: refused: data-root {d.roots[3]}: nothing to train on \(images/ with no image "
                   rf"files\)", d.logs, 120, run)
    ids = [_wait_for(log, rf"SuperNode (\d+): {root}: {holds}\n", d.logs, 10, run).group(1)
           for root, holds in zip(d.roots, HOLDS)]
    _wait_for(log, r"round 2: 3 clients on 3 SuperNodes in [\d.]+ s: node \d+: .*\(a ClientApp's mean: start [\d.]+ s, "
                   r"data [\d.]+ s, train [\d.]+ s\)", d.logs, 240, run)
    d.stop_node(2, signal.SIGTERM)
    m = _wait_for(log, r"round (\d+): SuperNode (\d+) \(client (\d)\) disconnected mid-round; \S+/last.pt holds round "
                       r"(\d+): start the node again and resume with run config resume=true", d.logs, 60)
    assert m.group(2) == ids[2] and int(m.group(3)) == sorted(ids, key=int).index(ids[2])  # client i: the i-th id
    _finish(run)
    ck = torch.load(out / "last.pt", weights_only=True)  # nothing saved is lost
    assert ck["round"] == int(m.group(4)) == int(m.group(1)) - 1 >= 2
    assert ck["config"]["fed"]["clients"] == 3 and ck["input_stats"] == {}  # each node used its own statistics
    assert all("Receiving:" in (d.logs / f"supernode{i}.log").read_text() for i in range(3))  # how nodes log a message
    listed = set(re.findall(r"SuperNode (\d+):", log.read_text()))  # every node the run named was an enrolled one
    assert listed and listed <= {str(i) for i in d.node_ids.values()}, (listed, d.node_ids)
    rec = [ln for ln in (out / "log.jsonl").read_text().splitlines() if '"round": 2,' in ln][0]
    # one epoch of whole batches of 32 on each node: images 64 + 32 (of 40), clips 32 (of 48) + 32 (of 40)
    assert '"samples_image": 96,' in rec and '"samples_audio": 64,' in rec
    res = finetune.main(["--ckpt", str(out), f"--run.out_dir={d.tmp / 'ft'}", "--run.progress=false",
                         "--eval.label_fractions=[1.0]", "--eval.protocols=[knn]", "--eval.max_train_images=300", "--eval.max_test_images=400",
                         "--eval.tasks=[image, audio]", "--eval.raw_input=false"])
    assert {r["task"] for r in res["rows"]} == {"image", "audio"}


def test_a_stranger_is_refused_and_never_receives_a_message(deployment):
    """The unregistered node (index 4) holds images and clips like site_both; that it is no client of the node-local
    run is asserted there (fed.clients == 3, every node the run lists enrolled)."""
    d = deployment
    log4 = d.logs / "supernode4.log"
    _wait_for(log4, r"Failed to activate SuperNode", d.logs, 60)
    assert d.refused() == 1 and len(d.node_ids) == 4  # the 4 enrolled ones registered; the stranger refused once
    assert "Receiving:" not in log4.read_text()  # it never got a message (how a node logs each one it gets:
    # asserted of an enrolled node in the node-local test)


def _listening(pids: list[int]) -> set[str]:
    """The IPv4/IPv6 addresses on which the processes `pids` hold listening TCP sockets (from /proc)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for ln in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = ln.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr = bytes.fromhex(f[1].split(":")[0])
                out.add(".".join(str(b) for b in addr[::-1]) if table == "tcp" else addr.hex())
    return out


def test_every_server_of_the_deployment_listens_on_loopback_only(deployment):
    """The SuperLink's one port (Fleet, Control and the ServerApp's API in flwr 1.41) and each SuperNode's
    ClientApp API: 127.0.0.1, nothing on 0.0.0.0 or another interface."""
    pids = _ours(deployment.home)
    addrs = _listening(pids)
    assert pids and addrs == {"127.0.0.1"}, addrs


@pytest.mark.parametrize("case", ["wrong CA", "plaintext", "missing key"])
def test_a_node_that_disagrees_with_the_superlink_stops_with_one_line(deployment, tmp_path, case):
    import subprocess
    import sys
    from fedengines.credentials import make_credentials
    from helpers import ROOT
    d = deployment
    key = make_credentials(tmp_path / "mine", hosts=["127.0.0.1"], nodes=1)["nodes"]["site0"][0]
    ca = d.creds / "ca.crt"
    args = {"wrong CA": [f"--root-certificates={tmp_path / 'mine' / 'ca.crt'}", f"--auth-supernode-private-key={key}"],
            "plaintext": ["--insecure"],
            "missing key": [f"--root-certificates={ca}", f"--auth-supernode-private-key={tmp_path / 'nokey'}"]}[case]
    want = {"wrong CA": rf"--root-certificates: {tmp_path / 'mine' / 'ca.crt'} did not sign the certificate of the "
                        rf"SuperLink at 127\.0\.0\.1:{d.link}",
            "plaintext": rf"--superlink 127\.0\.0\.1:{d.link} speaks TLS: give --root-certificates CA_FILE",
            "missing key": rf"--auth-supernode-private-key: {tmp_path / 'nokey'} does not exist"}[case]
    p = subprocess.run([sys.executable, "-m", "fedengines.flower_exec", *args, f"--superlink=127.0.0.1:{d.link}",
                        "--port=1"], cwd=ROOT, env=d.env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("WARNING --insecure")]
    assert p.returncode == 1 and len(lines) == 1 and re.match(rf"flower_exec: {want}", lines[0]), p.stderr


def _ours(home: Path) -> list[int]:
    """The live processes started for the deployment whose FLWR_HOME is `home` (every one inherits it)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"FLWR_HOME={home}".encode() in (d / "environ").read_bytes().split(b"\0") \
                    and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_a_stopped_deploy_stops_everything_it_started_and_says_how_to_resume(tmp_path, cache_dir):
    """SIGTERM here; SIGHUP and SIGINT take the same path (fedengines.localhost.STOP_SIGNALS, tested in test_nodes.py)."""
    sig = signal.SIGTERM
    import subprocess
    import sys
    from helpers import ROOT
    data = load_node_local_config("configs/smoke.yaml", TINY_DATA).data
    roots = [write_demo_node(tmp_path / f"site{i}", data, images=40, clips=40, seed=i) for i in range(2)]
    out = tmp_path / "run"
    argv = ["configs/smoke.yaml", "--node-data", *map(str, roots), *NODE_LOCAL[:-len(TINY_DATA)], *TINY_DATA,
            "--fed.clients_per_round=2", "--fed.rounds=200", f"--data.cache_dir={cache_dir}", f"--run.out_dir={out}"]
    proc = subprocess.Popen([sys.executable, "deploy.py", *argv], cwd=ROOT, env={**ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    home = out / "deployment" / "flwr_home"
    try:
        _wait_for(out / "deployment" / "flwr_run.log", r"round 2: 2 clients on 2 SuperNodes", out / "deployment", 240, proc)
        assert len(_ours(home)) >= 4  # SuperLink, its SuperExec, the ServerApp, SuperNodes, flwr run
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{signal.Signals(sig).name}: stopped the SuperLink, 2 SuperNodes and the run; {out}/last.pt")
    assert re.search(r"holds round \d+\. Resume with: python deploy.py configs/smoke.yaml .* --resume$", line), line
    time.sleep(1)
    assert _ours(home) == []  # nothing of the deployment is left running
    n = len((out / "log.jsonl").read_text().splitlines())
    time.sleep(3)
    assert len((out / "log.jsonl").read_text().splitlines()) == n  # and nothing writes the run directory any more
