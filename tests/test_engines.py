"""Same weights on every engine: torchrun (2 gloo ranks, and 2 local "nodes") and Flower's Simulation Engine each
end with a last.pt whose global weights equal the in-process run's, bit for bit (a Flower deployment: test_deployment.py). Every server a test starts listens on 127.0.0.1 and is killed (its whole process group) when the
test ends, passed or failed."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedengines.localhost import free_port
from helpers import _args, _procs, _run, _same, _weights


pytestmark = pytest.mark.slow  # every engine test starts servers or several processes


def _torchrun(*args) -> list[str]:
    """torchrun with 2 ranks on one node, its rendezvous on 127.0.0.1 at a free port, running pretrain.py."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "pretrain.py", *args]


def test_torchrun_across_two_nodes_equals_in_process(reference, tmp_path, cache_dir):
    """Two torchrun launchers standing for two machines (--nnodes=2, one rank each, a c10d rendezvous on 127.0.0.1)
    end on the in-process run's weights, bit for bit."""
    out, port = tmp_path / "two_nodes", free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=fssuavl-test", "pretrain.py", *_args(out, cache_dir)]
    with _procs() as start:
        nodes = [start(launch, tmp_path / f"node{i}.log") for i in range(2)]
        for i, p in enumerate(nodes):
            try:
                rc = p.wait(timeout=240)
            except subprocess.TimeoutExpired:
                pytest.fail(f"node {i} timed out:\n{(tmp_path / f'node{i}.log').read_text()[-3000:]}")
            assert rc == 0, (tmp_path / f"node{i}.log").read_text()[-3000:]
    _same(out, reference)
    logs = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    assert sum("engine Torchrun" in log for log in logs) == 1  # one process logs and writes the run


def test_torchrun_two_gloo_ranks_equal_in_process(reference, tmp_path, cache_dir):
    out = tmp_path / "torchrun"
    _run(_torchrun(*_args(out, cache_dir)), tmp_path / "torchrun.log")
    _same(reference, out)
    assert "engine Torchrun" in (tmp_path / "torchrun.log").read_text()


def test_server_state_strategy_on_torchrun_equals_in_process(tmp_path, cache_dir):
    """FedAvgM keeps server momentum: every rank steps its own copy with the same folded updates; with
    fed.share_head=false each client's own head, trained on whichever rank, reaches every rank's client_state.
    All reach the same bits as in process. (FedProx's client-side term equals in process through the digests.)"""
    extra = ["--fed.aggregation=fedavgm", "--fed.strategy.server_momentum=0.9", "--fed.share_head=false"]
    a, b = tmp_path / "inprocess", tmp_path / "torchrun"
    _run([sys.executable, "pretrain.py", *_args(a, cache_dir), *extra], tmp_path / "a.log")
    _run(_torchrun(*_args(b, cache_dir), *extra), tmp_path / "b.log")
    _same(a, b)
    ca, cb = (torch.load(d / "last.pt", weights_only=True) for d in (a, b))
    va, vb = ca["server_state"]["v"], cb["server_state"]["v"]
    assert va and all(torch.equal(va[k], vb[k]) for k in va)
    assert ca["client_state"] and ca["client_state"].keys() == cb["client_state"].keys()
    for c, heads in ca["client_state"].items():
        assert all(k.startswith("heads.") and torch.equal(v, cb["client_state"][c][k]) for k, v in heads.items())


def test_torchrun_stop_on_one_rank_stops_all_and_resume_is_exact(tmp_path, cache_dir):
    """SIGTERM to rank 1 alone: both ranks stop after their current step (no deadlock), exit 143, and a
    torchrun --resume ends where an uninterrupted in-process run of the same rounds ends."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run([sys.executable, "pretrain.py", *_args(full, cache_dir, rounds=3)], tmp_path / "full.log")
    cmd = _torchrun(*_args(cut, cache_dir, rounds=3))
    log = tmp_path / "cut.log"
    with _procs() as start:
        p = start(cmd, log)
        t0 = time.monotonic()
        while "round=1 " not in log.read_text():
            assert p.poll() is None and time.monotonic() - t0 < 180, log.read_text()[-3000:]
            time.sleep(0.2)
        ranks = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        workers = sorted(int(x) for x in ranks)  # torchrun's children: one per rank
        assert len(workers) == 2, ranks
        os.kill(workers[1], signal.SIGTERM)  # the higher pid: a rank other than the launcher's first
        p.wait(timeout=120)
    text = log.read_text()
    assert "exitcode  : 143" in text and "stopped during round" in text, text[-3000:]
    assert _weights(cut)[0] in (1, 2)
    _run(_torchrun("--resume", str(cut)), tmp_path / "resume.log")
    _same(full, cut)


def test_flower_simulation_equals_in_process(reference, tmp_path, cache_dir):
    out = tmp_path / "flower_sim"
    _run([sys.executable, "-m", "fedengines.flower_app", "--supernodes=2", *_args(out, cache_dir)], tmp_path / "sim.log")
    _same(reference, out)
    text = (tmp_path / "sim.log").read_text()
    assert "engine FlowerEngine" in text
    # the run directory is pretrain.py's: finetune.py and paper_tables.py read it unchanged
    assert (out / "config.yaml").exists() and (out / "log.jsonl").read_text().count("\n") == 3


def test_flower_simulation_resumes_a_killed_run(reference, tmp_path):
    """What a kill after round 1 leaves (last.pt of round 1, the log up to it; checkpoints are replaced atomically,
    tested with SIGKILL in test_resilience.py), resumed under Flower: it ends equal to the uninterrupted run."""
    import shutil
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(reference / "last.pt.prev", cut / "last.pt")
    shutil.copy(reference / "log.jsonl", cut / "log.jsonl")
    assert _weights(cut)[0] == 1
    _run([sys.executable, "-m", "fedengines.flower_app", "--supernodes=2", "--resume", str(cut)], tmp_path / "resume.log")
    assert "resuming" in (tmp_path / "resume.log").read_text()
    _same(reference, cut)
    assert [ln.count('"round"') for ln in (cut / "log.jsonl").read_text().splitlines()] == [1, 1, 1]


def test_under_torchrun_a_config_error_is_printed_once(tmp_path, cache_dir):
    with _procs() as start:
        p = start(_torchrun(*_args(tmp_path / "run", cache_dir), "--fed.aggregation=fedprox",
                             "--fed.strategy.prox_mu=0"), tmp_path / "t.log")
        assert p.wait(timeout=120) != 0
    text = (tmp_path / "t.log").read_text()
    assert text.count("error: fed.strategy.prox_mu=0.0: must be > 0") == 1, text[-3000:]


def test_a_lost_torchrun_rank_is_one_line_naming_the_round_and_the_resume_command(tmp_path, cache_dir):
    out = tmp_path / "run"
    with _procs() as start:
        p = start(_torchrun(*_args(out, cache_dir, rounds=10)), tmp_path / "t.log")
        t0 = time.monotonic()
        while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 3):
            assert p.poll() is None and time.monotonic() - t0 < 180, (tmp_path / "t.log").read_text()[-3000:]
            time.sleep(0.2)
        ranks = {}
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if b"RANK=1" in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and pid != p.pid:
                    ranks[pid] = env
        assert ranks, "rank 1 not found"
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        p.wait(timeout=120)
    text = (tmp_path / "t.log").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("error: "))
    assert "a torchrun rank was lost mid-round" in line and f"Resume with: torchrun --nproc_per_node=G pretrain.py --resume {out}" in line
    assert "pair.cc" not in text.split(line)[0]  # no gloo traceback of ours before the line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_flower_simulation_like_every_engine(tmp_path, cache_dir, sig):
    """SIGTERM / SIGINT to the simulation: the round in flight finishes, exit 143 / 130, the last completed round
    named with the Flower command that resumes it (Ray's own SIGTERM handler used to abort the process: exit 134)."""
    out = tmp_path / "run"
    with _procs() as start:
        p = start([sys.executable, "-m", "fedengines.flower_app", "--supernodes=2", *_args(out, cache_dir, rounds=8)], tmp_path / "f.log")
        t0 = time.monotonic()
        while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert p.poll() is None and time.monotonic() - t0 < 180, (tmp_path / "f.log").read_text()[-3000:]
            time.sleep(0.2)
        p.send_signal(sig)
        rc = p.wait(timeout=120)
    text = (tmp_path / "f.log").read_text()
    assert rc == 128 + sig, text[-3000:]
    assert f"Resume with: python -m fedengines.flower_app --supernodes 2 --resume {out}" in text and "Traceback" not in text
    assert _weights(out)[0] >= 1
