"""Runs survive kills, signals, corrupted checkpoints, broken clients, a full disk and bad configs."""
import errno
import json
import signal
import subprocess
import sys
import time

import pytest
import engine
import local_update
import checkpoints
import torch

import pretrain
from helpers import ROOT, TINY_DATA, smoke_args

sys.path.insert(0, str(ROOT / "scripts"))
import kill_resume  # noqa: E402


pytestmark = pytest.mark.usefixtures("in_root")


def _args(out, cache_dir, *extra):
    return smoke_args(out, cache_dir, "--run.deterministic=true", *extra)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, cache_dir):
    survived, mismatches = kill_resume.main(["--kills", "3", "--kills-per-run", "3", "--rounds", "5", "--seed", "1",
                                             "--workdir", str(tmp_path), f"--data.cache_dir={cache_dir}", *TINY_DATA])
    assert survived == 3 and mismatches == 0


def test_sigterm_finishes_the_step_and_says_how_to_resume(tmp_path, cache_dir):
    ref, run = tmp_path / "ref", tmp_path / "run"
    pretrain.main(_args(ref, cache_dir, "--fed.rounds=6"))
    cmd = [sys.executable, "pretrain.py", *_args(run, cache_dir, "--fed.rounds=6")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM" in err and f"Resume with: python pretrain.py --resume {run}" in err
    done = checkpoints.load_checkpoint(run / "last.pt")["round"]
    assert done >= 1
    pretrain.main(["--resume", str(run), "--run.progress=false"])
    a = torch.load(ref / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_or_truncated_checkpoint_falls_back_to_previous(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    pretrain.main(_args(out, cache_dir, "--fed.rounds=2"))
    good = (out / "last.pt").read_bytes()
    # a flipped byte inside the tensor data: still unpickles, caught by the checksum
    ck = torch.load(out / "last.pt", weights_only=True)
    k = next(iter(ck["model"]))
    ck["model"][k] = ck["model"][k] + 1
    torch.save(ck, out / "last.pt")
    with pytest.raises(checkpoints.CheckpointError, match="corrupted"):
        checkpoints.load_checkpoint(out / "last.pt")
    found, path = checkpoints.load_latest_checkpoint(out)
    assert path.name == "last.pt.prev" and found["round"] == 1
    assert "last.pt is corrupted" in capsys.readouterr().out
    (out / "last.pt").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(checkpoints.CheckpointError, match="unreadable"):
        checkpoints.load_checkpoint(out / "last.pt")
    pretrain.main(["--resume", str(out), "--run.progress=false"])  # redoes round 2 from the round-1 checkpoint
    assert checkpoints.load_checkpoint(out / "last.pt")["round"] == 2


def test_poisoned_client_is_rejected_and_logged(tmp_path, cache_dir, monkeypatch):
    real = local_update.local_ssl_update

    def poisoned(model, *a, **kw):
        metrics = real(model, *a, **kw)
        if poisoned.calls == 0:  # the first client of round 1 sends NaN weights
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        poisoned.calls += 1
        return metrics
    poisoned.calls = 0
    monkeypatch.setattr(engine, "local_ssl_update", poisoned)
    out = tmp_path / "run"
    pretrain.main(_args(out, cache_dir))
    rec = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()][1]
    assert rec["rejected"] == [rec["clients"][0]]
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_all_clients_rejected_keeps_the_global_model_and_fails_the_run(tmp_path, cache_dir, monkeypatch):
    real = local_update.local_ssl_update

    def nan_loss(*a, **kw):
        return {**real(*a, **kw), "loss_image": float("nan")}
    monkeypatch.setattr(engine, "local_ssl_update", nan_loss)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="round 1: every sampled client's update was non-finite"):
        pretrain.main(_args(out, cache_dir))
    ck = torch.load(out / "last.pt", weights_only=True)  # the random init, labelled as such: round 0
    assert ck["round"] == 0 and not (out / "last.pt.prev").exists()


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous(tmp_path, cache_dir, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] >= 2:  # round 0 saves, round 1 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"could not write checkpoint .*last.pt: No space left on device"):
        pretrain.main(_args(out, cache_dir))
    assert checkpoints.load_checkpoint(out / "last.pt")["round"] == 0
    assert not (out / "last.pt.tmp").exists()


@pytest.mark.parametrize("override, message", [
    ("--fed.clients_per_round=3", "fed.clients_per_round=3 is larger than fed.clients=2"),
    ("--fed.alpha=0", "fed.alpha=0.0: must be > 0"),
    ("--optim.lr=-0.1", "optim.lr=-0.1: must be > 0"),
    ("--optim.weight_decay=-1", "optim.weight_decay=-1.0: must be >= 0"),
    ("--fed.modality_fractions=[1.0, 0.0, 0.0]", "gives no client audio data"),
    ("--optim.batch_size=4096", "optim.batch_size=4096 is larger than every client's image data"),
    ("--data.modalities=[video]", "data.modalities=['video']"),
    ("--model.arch=resnet99", "model.arch='resnet99': expected one of"),
])
def test_impossible_configs_end_with_one_clear_line(tmp_path, cache_dir, override, message):
    with pytest.raises(SystemExit) as e:
        pretrain.main(_args(tmp_path / "run", cache_dir, override))
    text = str(e.value.code)
    assert message in text and "\n" not in text
