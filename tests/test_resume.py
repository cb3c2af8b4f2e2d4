"""Exact resume: runs survive SIGKILL anywhere, SIGTERM, corrupted or truncated checkpoints and a full disk; resume
edge cases end where they should, and checkpoint refusals never suggest an unsafe load."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import finetune
import pretrain
from helpers import ROOT, TINY_DATA, log_rounds, one_line_error, smoke_args


sys.path.insert(0, str(ROOT / "scripts"))
import kill_resume  # noqa: E402


pytestmark = pytest.mark.usefixtures("in_root")


def _args(out, cache_dir, *extra):
    return smoke_args(out, cache_dir, "--run.deterministic=true", *extra)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, cache_dir, capsys):
    """One kill of each kind (start-up, random over what is left, inside a round, inside a checkpoint write, inside
    a resumed attempt's first round), with per-client heads and FedAvgM so that the client and server state are
    compared too."""
    survived, mismatches = kill_resume.main(["--kills", "5", "--kills-per-run", "5", "--rounds", "5", "--seed", "1",
                                             "--workdir", str(tmp_path), f"--data.cache_dir={cache_dir}", *TINY_DATA,
                                             "--model.head=per_modality", "--fed.share_head=false",
                                             "--fed.aggregation=fedavgm"])
    assert survived == 5 and mismatches == 0
    # a kill whose moment the attempt outran (it finished first) moves the cycle of kinds on, so which kinds ran
    # depends on the machine's speed: at least three of the five, all five kills counted
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("kills by kind: "))
    counts = {k: int(n) for k, n in (part.rsplit(" ", 1) for part in line[len("kills by kind: "):].split(", "))}
    assert sum(counts.values()) == 5 and sum(n > 0 for n in counts.values()) >= 3, line
    end = kill_resume.final_state(tmp_path / "reference")
    assert end["server_state"] and end["client_state"]  # both were there to compare
    assert kill_resume.same_state(end, kill_resume.final_state(tmp_path / "reference"))


def test_the_kill_harness_tells_any_end_state_apart():
    a = {"model": {"w": torch.zeros(2)}, "server_state": {"momentum": {"w": torch.zeros(2)}}, "optimizer": None}
    moved = {**a, "server_state": {"momentum": {"w": torch.tensor([0.0, 1e-7])}}}
    assert kill_resume.same_state(a, {**a}) and not kill_resume.same_state(moved, a)
    assert not kill_resume.same_state({**a, "optimizer": {"state": {}}}, a)
    assert not kill_resume.same_state({"model": {"w": torch.zeros(2, dtype=torch.float64)}}, {"model": {"w": torch.zeros(2)}})


@pytest.mark.slow
def test_sigterm_finishes_the_step_and_says_how_to_resume(tmp_path, cache_dir):
    ref, run = tmp_path / "ref", tmp_path / "run"
    pretrain.main(_args(ref, cache_dir, "--fed.rounds=6"))
    # each checkpoint write pauses 1 s, so the run is still going when the signal comes (it never finishes first)
    cmd = [sys.executable, "scripts/paused_saves.py", "1.0", "pretrain.py", *_args(run, cache_dir, "--fed.rounds=6")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 900  # progress decides when to signal; the deadline only bounds a hang (loaded machine)
    while proc.poll() is None and time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    assert proc.poll() is None and len(log.read_text().splitlines()) >= 2, "round 1 never logged, or the run ended"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM" in err and f"Resume with: python pretrain.py --resume {run}" in err
    done = checkpoints.load_checkpoint(run / "last.pt")["round"]
    assert done >= 1
    pretrain.main(["--resume", str(run), "--run.progress=false"])
    a = torch.load(ref / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_edge_cases(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    pretrain.main(_args(out, cache_dir, "--fed.rounds=3"))
    # resume from round 0 twice: round 0 is logged once
    zero = tmp_path / "zero"
    zero.mkdir()
    ck = torch.load(out / "last.pt", weights_only=True)
    for _ in range(2):
        r0 = torch.load(out / "last.pt.prev", weights_only=True)  # round 2
        r0 = {k: v for k, v in r0.items() if k not in ("sha256", "digest")}
        r0.update(round=0, evals=r0["evals"][:1])
        checkpoints.save_checkpoint(r0, zero / "last.pt", keep_previous=False)
        (zero / "log.jsonl").write_text(json.dumps({"round": 0}) + "\n")
        pretrain.main(["--resume", str(zero), "--run.progress=false", "--fed.rounds=1"])
    assert log_rounds(zero) == [0, 1] and len(checkpoints.load_checkpoint(zero / "last.pt")["evals"]) == 2
    # fed.rounds below the completed rounds: refused, config.yaml untouched
    before = (out / "config.yaml").read_text()
    assert "fed.rounds=2 is below the 3 rounds" in one_line_error(
        pretrain.main, ["--resume", str(out), "--fed.rounds=2", "--run.progress=false"])
    assert (out / "config.yaml").read_text() == before
    # --resume RUN/last.pt.prev loads exactly that file (round 2) and redoes round 3
    pretrain.main(["--resume", str(out / "last.pt.prev"), "--run.progress=false"])
    assert "resuming" in capsys.readouterr().out
    assert torch.equal(checkpoints.load_checkpoint(out / "last.pt")["model"]["trunk.layers.0.conv1.weight"],
                       ck["model"]["trunk.layers.0.conv1.weight"])
    assert log_rounds(out) == [0, 1, 2, 3]
    # an edited round is caught by the digest; the fallback keeps the good previous copy (round 3 since the redo)
    bad = torch.load(out / "last.pt", weights_only=True)
    bad["round"] = 99
    torch.save(bad, out / "last.pt")
    good_prev = (out / "last.pt.prev").read_bytes()
    found, path = checkpoints.load_latest_checkpoint(out, warn=lambda m: None)
    assert path.name == "last.pt.prev" and found["round"] == 3
    assert (out / "last.pt.corrupt").exists() and (out / "last.pt.prev").read_bytes() == good_prev
    pretrain.main(["--resume", str(out), "--run.progress=false", "--fed.rounds=4"])
    assert checkpoints.load_checkpoint(out / "last.pt")["round"] == 4
    assert (out / "last.pt.prev").read_bytes() == good_prev  # the tampered file was not rotated over it
    assert log_rounds(out) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- checkpoints

def test_refusals_never_suggest_the_unsafe_load(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"format": 1, "x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, expect in (("evil.pt", "refusing"), ("text.pt", "unreadable")):
        with pytest.raises(checkpoints.CheckpointError) as e:
            checkpoints.load_checkpoint(tmp_path / name)
        assert expect in str(e.value) and "weights_only" not in str(e.value) and "safe_globals" not in str(e.value)
    msg = one_line_error(finetune.main, ["--ckpt", str(tmp_path / "evil.pt")])
    assert "could run arbitrary code" in msg and "weights_only=False" not in msg


# ----------------------------------------------------------------------------- finetune.py


@pytest.mark.slow
def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_with_its_own_config(tmp_path, cache_dir, capsys):
    """A run killed right after config.yaml was written: the refusal's advice (--resume DIR) now works."""
    out = tmp_path / "run"
    pretrain.main(_args(out, cache_dir, "--fed.rounds=1"))
    for f in ("last.pt", "last.pt.prev", "log.jsonl"):
        (out / f).unlink(missing_ok=True)
    assert "Continue it with `python pretrain.py --resume" in one_line_error(pretrain.main, _args(out, cache_dir))
    pretrain.main(["--resume", str(out), "--run.progress=false"])
    assert "no checkpoint yet; starting the run from round 0 with its config.yaml" in capsys.readouterr().out
    assert checkpoints.load_checkpoint(out / "last.pt")["round"] == 1
    assert "nothing to continue" in one_line_error(pretrain.main, ["--resume", str(tmp_path / "void")])


@pytest.mark.slow
def test_a_checkpoint_signed_again_with_another_runs_config_is_named_before_any_data(tmp_path, cache_dir):
    out = tmp_path / "run"
    pretrain.main(_args(out, cache_dir, "--fed.rounds=1", "--run.final_probe=false"))
    ck = {k: v for k, v in checkpoints.load_checkpoint(out / "last.pt").items() if k not in ("sha256", "digest")}
    ck["config"]["model"]["width"] = 16
    ck["config"]["data"]["dataset"] = "cifar10+esc50"  # whose files are not here: the weights are named first
    checkpoints.save_checkpoint(ck, out / "last.pt", keep_previous=False)
    msg = one_line_error(pretrain.main, ["--resume", str(out), "--fed.rounds=2", "--run.progress=false"])
    assert "this checkpoint's config does not belong to its weights" in msg and "not found" not in msg
    # the same model, only the data edited: named from what the config alone says of the inputs, before any file
    good = {k: v for k, v in checkpoints.load_checkpoint(out / "last.pt.prev").items() if k not in ("sha256", "digest")}
    for key, value, says in (("dataset", "cifar10+esc50", "image inputs (3, ...) but the weights were trained on (1, 28, 28)"), ("n_mels", 64, "audio inputs (1, 64,")):
        ck = {**good, "config": {**good["config"], "data": {**good["config"]["data"], key: value}}}
        checkpoints.save_checkpoint(ck, out / "last.pt", keep_previous=False)
        msg = one_line_error(pretrain.main, ["--resume", str(out), "--fed.rounds=2", "--run.progress=false"])
        assert "does not belong to its weights" in msg and says in msg and "not found" not in msg, msg


@pytest.mark.slow
def test_following_the_undigested_advice_resumes_and_loses_no_round(tmp_path, cache_dir, monkeypatch):
    monkeypatch.delenv("FSSUAVL_ACCEPT_UNDIGESTED", raising=False)
    out = tmp_path / "run"
    pretrain.main(_args(out, cache_dir, "--fed.rounds=2"))
    for name in ("last.pt", "last.pt.prev"):  # as an older version wrote them: readable, no digest over all
        ck = torch.load(out / name, weights_only=True)
        torch.save({k: v for k, v in ck.items() if k not in ("sha256", "digest")}, out / name)
    log = (out / "log.jsonl").read_text()
    msg = one_line_error(pretrain.main, ["--resume", str(out), "--fed.rounds=3", "--run.progress=false"])
    assert "carries no sha256 over all of its contents" in msg and "FSSUAVL_ACCEPT_UNDIGESTED=1" in msg
    assert (out / "last.pt").is_file() and not (out / "last.pt.corrupt").exists() and (out / "log.jsonl").read_text() == log
    monkeypatch.setenv("FSSUAVL_ACCEPT_UNDIGESTED", "1")  # the advice, followed
    pretrain.main(["--resume", str(out), "--fed.rounds=3", "--run.progress=false"])
    assert log_rounds(out) == [0, 1, 2, 3]
    # a checkpoint gone while the log records trained rounds: the resume refuses rather than start over
    for p in out.glob("last.pt*"):
        p.unlink()
    log = (out / "log.jsonl").read_text()
    msg = one_line_error(pretrain.main, ["--resume", str(out), "--run.progress=false"])
    assert "its log.jsonl records rounds 1-3: starting over would rewrite them, so nothing was done" in msg
    assert (out / "log.jsonl").read_text() == log


def _signal_then_wait(real):
    """`real`, preceded by a SIGTERM to this process and a wait that only a stop cuts short."""
    def wrapped(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        return real(*a, **kw)
    return wrapped


@pytest.mark.parametrize("where, said", [("data", "stopped during start-up; nothing was trained or saved"),
                                         ("round0", "stopped before round 0 was saved; nothing was trained")])
def test_a_stop_during_start_up_ends_the_run_at_once(tmp_path, cache_dir, monkeypatch, capsys, where, said):
    import engine
    import pretraining
    if where == "data":
        monkeypatch.setattr(engine, "load_data", _signal_then_wait(engine.load_data))
    else:
        monkeypatch.setattr(pretraining, "evaluate", _signal_then_wait(pretraining.evaluate))
    out = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        pretrain.main(_args(out, cache_dir))
    assert e.value.code == 128 + signal.SIGTERM and time.monotonic() - t0 < 50  # not after the 60 s wait
    assert f"SIGTERM: {said}" in capsys.readouterr().err
    assert not (out / "last.pt").exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_stop_during_a_monitor_evaluation_ends_it_at_once_and_keeps_the_last_round(tmp_path, cache_dir, monkeypatch, capsys):
    import pretraining
    calls, real = [], pretraining.evaluate

    def second_waits(*a, **kw):  # round 0's evaluation runs; round 1's is where the stop comes
        calls.append(1)
        return (_signal_then_wait(real) if len(calls) == 2 else real)(*a, **kw)
    monkeypatch.setattr(pretraining, "evaluate", second_waits)
    out = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        pretrain.main(_args(out, cache_dir, "--fed.rounds=2", "--run.eval_every=1"))
    assert e.value.code == 128 + signal.SIGTERM and time.monotonic() - t0 < 50
    assert f"SIGTERM: stopped during round 1; {out}/last.pt holds round 0" in capsys.readouterr().err
    assert checkpoints.load_checkpoint(out / "last.pt")["round"] == 0 and log_rounds(out) == [0]
