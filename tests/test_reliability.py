"""Nothing lost, nothing silently wrong: run directories, diverged runs, poisoned clients, stale caches, and bad
input that ends with one line naming the problem."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import avfashion
import checkpoints
import engine
import finetune
import layouts
import local_update
import pretrain
from helpers import ROOT, log_rounds, one_line_error, smoke_args


pytestmark = pytest.mark.usefixtures("in_root")


def _args(out, cache_dir, *extra):
    return smoke_args(out, cache_dir, "--run.final_probe=false", *extra)


# ----------------------------------------------------------------------------- diverged runs

@pytest.mark.slow
def test_a_diverged_round_ends_the_run_non_zero_and_saves_nothing_as_trained(tmp_path, cache_dir, monkeypatch):
    real = local_update.local_ssl_update
    monkeypatch.setattr(engine, "local_ssl_update", lambda *a, **kw: {**real(*a, **kw), "loss_audio": float("nan")})
    out = tmp_path / "run"
    msg = one_line_error(pretrain.main, _args(out, cache_dir, "--fed.rounds=3"))
    assert "round 1: every sampled client's update was non-finite" in msg and "last.pt holds round 0" in msg
    ck = checkpoints.load_checkpoint(out / "last.pt")
    assert ck["round"] == 0  # never claims a training round that did not happen
    assert log_rounds(out) == [0, 1] and json.loads((out / "log.jsonl").read_text().splitlines()[1])["diverged"]


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=1e999", "optim.lr=inf: expected a finite number"),
    ("--optim.lr=1e6", "optim.lr=1000000.0: must be <= 10.0"),
    ("--loss.tau=0.0001", "loss.tau=0.0001: must be >= 0.01"),
    ("--fed.aggregation=fedavgm --fed.strategy.server_lr=100", "fed.strategy.server_lr=100.0: must be <= 10.0"),
    ("--fed.strategy.server_lr=0.5", "fed.strategy.server_lr is not a hyperparameter of fed.aggregation=fedavg (it takes "
                                      "none); it belongs to fed.aggregation=fedavgm"),
    ("--optim.warmup_rounds=1000000000", "optim.warmup_rounds=1000000000 must be below fed.rounds=1"),
    ("--optim.momentum=1.5", "optim.momentum=1.5: must be <= 0.9999"),
    ("--fed.clients=1000000000", "fed.clients=1000000000: must be <= 1000000"),
    ("--fed.clients=400", "cannot give"),  # more clients than samples: refused before any memory is spent
    ("--run.seed=-1", "run.seed=-1: must be >= 0"),
    ("--run.seed=99999999999999999999", "run.seed=99999999999999999999: must be <= "),
    ("--run.device=cuda", "CUDA is not available"),
    ("--model.arch=vit_micro", None),  # patch 4 on 28 px is fine: a control that this config runs at all
    ("--model.arch=vit_micro --model.patch_size=64", "model.patch_size=64 is larger than the input 28x28"),
    ("--data.n_mels=4096", "data.n_mels=4096: must be <= 1024"),
    # settings that would do nothing
    ("--loss.name=vicreg --loss.vicreg_sim=0 --loss.vicreg_var=0 --loss.vicreg_cov=0",
     "loss.vicreg_sim, loss.vicreg_var, loss.vicreg_cov are all 0: loss.name=vicreg would train nothing"),
    ("--loss.vicreg_cov=5", "loss.vicreg_cov=5.0 acts only under loss.name=vicreg, but loss.name=nt_xent"),
    ("--run.out_dir=2024", "run.out_dir=2024: expected a string, and 2024 reads as a number: quote it (--run.out_dir=\"'2024'\""),
])
def test_bad_numbers_end_with_one_line(tmp_path, cache_dir, override, message):
    if message is None:
        pretrain.main(_args(tmp_path / "run", cache_dir, *override.split(), "--run.dry_run=true"))
        return
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert message in one_line_error(pretrain.main, _args(tmp_path / "run", cache_dir, *override.split()))


def test_nan_in_yaml_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss:\n  tau: .nan\n")
    assert "loss.tau=nan: expected a finite number" in one_line_error(pretrain.main, [str(cfg)])


@pytest.mark.parametrize("content, message", [
    (b"fed:\n  rounds: [1\n", "invalid YAML at line"),
    (b"fed:\n\trounds: 2\n", "never tabs"),
    (b"fed:\n  rounds: 2 # caf\xe9\n", "not UTF-8"),
    (b"- a\n- b\n", "top level must be a mapping"),
])
def test_broken_config_files_end_with_one_line(tmp_path, content, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    assert message in one_line_error(pretrain.main, [str(cfg)])


# ----------------------------------------------------------------------------- run directories

@pytest.mark.slow
def test_a_second_run_in_the_same_directory_is_refused_then_moved_aside(tmp_path, cache_dir):
    out = tmp_path / "run"
    pretrain.main(_args(out, cache_dir))
    first = (out / "last.pt").read_bytes()
    msg = one_line_error(pretrain.main, _args(out, cache_dir))
    assert "already holds a run at round 1 of 1 (finished)" in msg and f"--resume {out}" in msg
    assert (out / "last.pt").read_bytes() == first and log_rounds(out) == [0, 1]  # nothing touched
    pretrain.main(_args(out, cache_dir, "--run.overwrite=true"))
    assert (tmp_path / "run.old-1" / "last.pt").read_bytes() == first  # moved aside, never deleted
    assert log_rounds(out) == [0, 1]


@pytest.mark.slow
def test_a_directory_in_use_is_locked(tmp_path, cache_dir):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.'); import checkpoints; d = checkpoints.RunDir(sys.argv[1]); "
        "d.prepare(resume=False, overwrite=False); print('locked', flush=True); time.sleep(60)"), str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = one_line_error(pretrain.main, _args(out, cache_dir, "--fed.rounds=1"))
        assert f"is in use by another run (PID {holder.pid})" in msg
    finally:
        holder.kill()
        holder.wait(timeout=30)
    pretrain.main(_args(out, cache_dir))  # the kernel released the lock with the process


def test_out_dir_that_is_a_file_and_tilde_paths(tmp_path, cache_dir, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in one_line_error(pretrain.main, _args(tmp_path / "file", cache_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", "deep")
    pretrain.main(_args("~/$RUNS/x", cache_dir))
    assert (tmp_path / "home" / "deep" / "x" / "last.pt").is_file() and not (ROOT / "~").exists()


# ----------------------------------------------------------------------------- resume edge cases

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("rel") / "run"
    pretrain.main(_args(out, cache_dir))
    return out / "last.pt"


def test_finetune_checks_the_inputs_against_the_checkpoint(pretrained, tmp_path):
    msg = one_line_error(finetune.main, ["--ckpt", str(pretrained), f"--run.out_dir={tmp_path}", "--data.n_mels=64"])
    assert "audio inputs are (1, 64, 51) but the checkpoint was trained on (1, 32, 51)" in msg
    assert "data.n_mels=64 (checkpoint: 32)" in msg


@pytest.mark.parametrize("override, message", [
    ("--eval.tasks=[]", "eval.tasks=[]: give at least one"),
    ("--eval.probe_iters=0", "eval.probe_iters=0: must be >= 1"),
    ("--eval.wd_grid=[]", "eval.wd_grid=[]"),
    ("--run.out_dir=/dev/null/x", "cannot write results to /dev/null/x"),
])
def test_finetune_bad_settings(pretrained, tmp_path, override, message):
    args = ["--ckpt", str(pretrained), "--eval.tasks=[image]", "--eval.protocols=[knn]", "--eval.label_fractions=[1.0]",
            "--eval.max_train_images=200", override]
    assert message in one_line_error(finetune.main, args)


def test_finetune_width_mismatch_is_one_line(pretrained, tmp_path):
    ck = torch.load(pretrained, weights_only=True)
    ck = {k: v for k, v in ck.items() if k not in ("sha256", "digest")}
    ck["config"]["model"]["width"] = 16  # a config edited after training: the weights are width 8
    checkpoints.save_checkpoint(ck, tmp_path / "edited.pt", keep_previous=False)
    assert "tensor shapes do not match" in one_line_error(finetune.main, ["--ckpt", str(tmp_path / "edited.pt")])


# ----------------------------------------------------------------------------- data and caches

def _audiofolder(root, rows):
    for r in rows:
        layouts.noise_wav(root / r["file"], seconds=0.3)
    layouts.write_csv(root / "labels.csv", rows)


def _load_audiofolder(tmp_path, root):
    from data import DataConfig
    from catalog import load_data
    cfg = DataConfig(dataset="cifar10+audiofolder", modalities=("audio",), audio_root=str(root),
                     cache_dir=str(tmp_path / "cache"), n_mels=16, clip_seconds=0.3)
    return load_data(cfg, torch.device("cpu"))["audio"]


def test_dataset_cache_follows_the_content_it_was_built_from(tmp_path):
    root = tmp_path / "af"
    rows = [{"file": f"c/{i}.wav", "label": "ab"[i % 2], "split": "test" if i < 2 else "train"} for i in range(8)]
    _audiofolder(root, rows)
    assert _load_audiofolder(tmp_path, root).classes == ["a", "b"]
    for r in rows:  # rename the classes in labels.csv: the cache must not hand back the old ones
        r["label"] = {"a": "yes", "b": "no"}[r["label"]]
    layouts.write_csv(root / "labels.csv", rows)
    md = _load_audiofolder(tmp_path, root)
    assert md.classes == ["no", "yes"] and len(list((tmp_path / "cache").glob("audiofolder-audio-*"))) == 2


def test_corrupt_dataset_cache_is_named_and_rebuilt(tmp_path, capsys):
    root = tmp_path / "af"
    _audiofolder(root, [{"file": f"c/{i}.wav", "label": "ab"[i % 2], "split": "test" if i < 2 else "train"}
                        for i in range(8)])
    want = _load_audiofolder(tmp_path, root).train_x
    (cache,) = (tmp_path / "cache").glob("audiofolder-audio-*")
    x = cache / "train_x.npy"
    x.write_bytes(x.read_bytes()[:300])  # truncated: np.load raises
    assert torch.equal(_load_audiofolder(tmp_path, root).train_x, want)
    assert f"cache {cache} is unreadable" in capsys.readouterr().out


@pytest.mark.slow
def test_corrupt_avfashion_cache_is_rebuilt(tmp_path, capsys):
    from data import DataConfig
    from avfashion import build_avfashion
    cfg = DataConfig(n_voices=4, cache_dir=str(tmp_path))
    path = build_avfashion(cfg, progress=False)
    path.write_bytes(b"PK\x03\x04 broken")
    assert build_avfashion(cfg, progress=False) == path and np.load(path)["audio"].shape[0] == 4 * 20
    assert "is unreadable" in capsys.readouterr().out


def test_two_cache_writes_at_once_do_not_collide(tmp_path):
    from data import read_npz, write_npz
    path = tmp_path / "x.npz"
    errors = []

    def write(v):
        try:
            write_npz(path, {"a": np.full(200_000, v)})
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=write, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and read_npz(path)["a"][0] in range(4) and not list(tmp_path.glob("*.tmp.npz"))


@pytest.mark.parametrize("rows, message", [
    ([{"file": "c/0.wav", "label": ""}], "line 2: empty label"),
    ([{"file": "c/0.wav", "label": "a"}, {"file": "", "label": "a"}], "line 3: empty file"),
    ([{"file": f"c/{i}.wav", "label": "a", "split": "test" if i < 2 else "train"} for i in range(6)],
     "has 1 class"),
])
def test_degenerate_labels(tmp_path, cache_dir, rows, message):
    root = tmp_path / "af"
    _audiofolder(root, [r for r in rows if r["file"]] or rows)
    layouts.write_csv(root / "labels.csv", rows)
    args = ["configs/smoke.yaml", f"--run.out_dir={tmp_path / 'run'}", f"--data.cache_dir={cache_dir}",
            "--data.dataset=cifar10+audiofolder", "--data.modalities=[audio]", f"--data.audio_root={root}",
            "--data.clip_seconds=0.3", "--data.n_mels=16", "--fed.federation=single"]
    assert message in one_line_error(pretrain.main, args)


def test_avfashion_cache_loads_without_espeak_and_follows_its_version(tmp_path, monkeypatch, capsys):
    from data import DataConfig
    from avfashion import build_avfashion
    cfg = DataConfig(n_voices=3, cache_dir=str(tmp_path))
    path = build_avfashion(cfg, progress=False)
    real_which = avfashion.shutil.which
    monkeypatch.setattr(avfashion.shutil, "which", lambda name: None if name == "espeak-ng" else real_which(name))
    assert build_avfashion(cfg, progress=False) == path  # no espeak-ng here: the cache is used as it is
    monkeypatch.setattr(avfashion.shutil, "which", real_which)
    z = dict(np.load(path))
    z["espeak"] = np.asarray("eSpeak NG text-to-speech: 0.0")  # built by another espeak-ng
    np.savez(path, **z)
    assert build_avfashion(cfg, progress=False) == path and "built with another espeak-ng" in capsys.readouterr().out
    assert str(np.load(path)["espeak"]) != "eSpeak NG text-to-speech: 0.0"
def _det_args(out, cache_dir, *extra):
    return smoke_args(out, cache_dir, "--run.deterministic=true", *extra)


@pytest.mark.slow
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
    pretrain.main(_det_args(out, cache_dir))
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
        pretrain.main(_det_args(out, cache_dir))
    ck = torch.load(out / "last.pt", weights_only=True)  # the random init, labelled as such: round 0
    assert ck["round"] == 0 and not (out / "last.pt.prev").exists()


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
        pretrain.main(_det_args(tmp_path / "run", cache_dir, override))
    text = str(e.value.code)
    assert message in text and "\n" not in text


# ----------------------------------------------------------------------------- nothing silently wrong (issue 21)

def test_a_same_size_label_edit_with_its_mtime_restored_is_not_served_from_the_cache(tmp_path):
    import os
    root = tmp_path / "af"
    rows = [{"file": f"c/{i}.wav", "label": "ab"[i % 2], "split": "test" if i < 2 else "train"} for i in range(8)]
    _audiofolder(root, rows)
    before = _load_audiofolder(tmp_path, root).train_y.tolist()
    st = (root / "labels.csv").stat()
    rows[3]["label"], rows[4]["label"] = rows[4]["label"], rows[3]["label"]  # same size, two labels swapped
    layouts.write_csv(root / "labels.csv", rows)
    os.utime(root / "labels.csv", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (root / "labels.csv").stat().st_size == st.st_size
    assert _load_audiofolder(tmp_path, root).train_y.tolist() != before


def test_audiofolder_labels_are_stripped_and_non_utf8_is_one_line(tmp_path):
    from data import DataError
    root = tmp_path / "af"
    rows = [{"file": f"c/{i}.wav", "label": ["class0", "class0 ", " class1"][i % 3], "split": "test" if i < 3 else "train"}
            for i in range(9)]
    _audiofolder(root, rows)
    assert _load_audiofolder(tmp_path, root).classes == ["class0", "class1"]
    (root / "labels.csv").write_bytes("file,label\nc/0.wav,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"labels.csv is not UTF-8 text \(byte \d+\): save it as UTF-8"):
        _load_audiofolder(tmp_path, root)


def test_an_unset_variable_in_a_path_is_an_error_not_a_folder(tmp_path, cache_dir, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    msg = one_line_error(pretrain.main, _args(tmp_path / "x", cache_dir, "--run.out_dir=$NO_SUCH_VAR_X/runs/v"))
    assert "run.out_dir='$NO_SUCH_VAR_X/runs/v': the environment variable $NO_SUCH_VAR_X is not set" in msg
    assert not (tmp_path / "$NO_SUCH_VAR_X").exists() and not list(tmp_path.glob("*NO_SUCH*"))


def test_a_config_beside_resume_run_dir_is_refused(tmp_path):
    msg = one_line_error(pretrain.main, ["configs/default.yaml", "--resume", str(tmp_path / "r3")])
    assert "the config file configs/default.yaml would be ignored: drop it" in msg


def test_a_trimmed_mean_that_trims_nothing_is_refused():
    from federation import FedConfig
    from settings import ConfigError
    with pytest.raises(ConfigError, match=r"trims nothing .*raise fed.strategy.trim_frac to at least 0.2, raise "
                                          r"fed.clients_per_round to at least 10, or use fed.aggregation=median"):
        FedConfig(aggregation="trimmed_mean", clients_per_round=5, strategy={"trim_frac": 0.1}, clients=10)
    FedConfig(aggregation="trimmed_mean", clients_per_round=5, strategy={"trim_frac": 0.2}, clients=10)  # cuts one each end


def test_a_checkpoint_without_its_digest_is_refused_unless_accepted_knowingly(tmp_path, monkeypatch, capsys):
    ck = {"format": checkpoints.CKPT_FORMAT, "round": 1, "model": {"w": torch.ones(2)}}
    checkpoints.save_checkpoint(ck, tmp_path / "a.pt")
    for strip in (("sha256",), ("digest",), ("sha256", "digest")):
        obj = {k: v for k, v in torch.load(tmp_path / "a.pt", weights_only=True).items() if k not in strip}
        obj["round"] = 99  # the edit a stripped digest would hide
        torch.save(obj, tmp_path / "b.pt")
        monkeypatch.delenv("FSSUAVL_ACCEPT_UNDIGESTED", raising=False)
        with pytest.raises(checkpoints.CheckpointError, match=r"no sha256 over all of its contents.*FSSUAVL_ACCEPT_UNDIGESTED=1"):
            checkpoints.load_checkpoint(tmp_path / "b.pt")
    monkeypatch.setenv("FSSUAVL_ACCEPT_UNDIGESTED", "1")
    torch.save({k: v for k, v in obj.items()}, tmp_path / "c.pt")
    assert checkpoints.load_checkpoint(tmp_path / "c.pt")["round"] == 99 and "without a full digest" in capsys.readouterr().out


def test_a_policy_refusal_leaves_the_checkpoint_in_place_and_a_restart_over_logged_rounds_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("FSSUAVL_ACCEPT_UNDIGESTED", raising=False)
    ck = {"format": checkpoints.CKPT_FORMAT, "round": 2, "model": {"w": torch.ones(2)}}
    torch.save(ck, tmp_path / "last.pt")  # readable, but written without a digest (an older version)
    with pytest.raises(checkpoints.UndigestedCheckpoint, match="FSSUAVL_ACCEPT_UNDIGESTED=1"):
        checkpoints.load_latest_checkpoint(tmp_path)
    assert (tmp_path / "last.pt").is_file() and not list(tmp_path.glob("*.corrupt"))  # so the advice finds it
    monkeypatch.setenv("FSSUAVL_ACCEPT_UNDIGESTED", "1")
    assert checkpoints.load_latest_checkpoint(tmp_path)[0]["round"] == 2
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(3)))
    os.replace(tmp_path / "last.pt", tmp_path / "last.pt.corrupt")
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.refuse_restart(tmp_path)
    assert str(e.value) == (f"--resume {tmp_path}: no checkpoint to continue from, but its log.jsonl records rounds 1-2: "
                            f"starting over would rewrite them, so nothing was done. It holds last.pt.corrupt: if you "
                            f"trust it, move it back to last.pt and resume; or start afresh with --run.overwrite=true "
                            f"(the old run is moved aside)")
    (tmp_path / "log.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    checkpoints.refuse_restart(tmp_path)  # only round 0 logged: nothing trained is lost by starting over


def test_the_log_on_resume_drops_bad_records_and_names_missinglog_rounds(tmp_path):
    log = checkpoints.JsonlLog(tmp_path / "log.jsonl")
    for rec in ({"round": 0}, {"round": "x"}, {"round": 2}, {"round": 2}, {"round": 3}, {"round": True}):
        log.write(rec)
    with open(log.path, "a") as f:
        f.write('{"round": 4, "cut sh')
    said = []
    assert log.truncate_after(3, warn=said.append) == [1]
    assert said == [f"warning: {log.path} line 2: not a round record (no integer round); dropped from the log",
                    f"warning: {log.path} line 4: a second record of round 2; dropped from the log",
                    f"warning: {log.path} line 6: not a round record (no integer round); dropped from the log",
                    f"warning: {log.path} line 7: cut short (a write stopped by a kill); dropped from the log"]
    assert log_rounds(tmp_path) == [0, 2, 3]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "log.jsonl").mkdir()
    with pytest.raises(checkpoints.RunDirError, match="is a directory, not the run's log"):
        checkpoints.JsonlLog(tmp_path / "d" / "log.jsonl").truncate_after(1)


@pytest.mark.slow
def test_finetune_refuses_tasks_the_checkpoint_cannot_do_and_resume_names_a_lost_record(tmp_path, cache_dir, capsys):
    out = tmp_path / "img"
    pretrain.main(_args(out, cache_dir, "--data.modalities=[image]", "--fed.rounds=2", "--run.eval_every=0"))
    msg = one_line_error(finetune.main, ["--ckpt", str(out), "--eval.tasks=[audio, paired]"])
    assert "eval.tasks=['audio', 'paired']: none applies to" in msg and "pretrained on image" in msg
    assert not (out / "results.json").exists()
    recs = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join(r for r in recs if json.loads(r)["round"] != 1) + "\n")
    capsys.readouterr()
    pretrain.main(["--resume", str(out), "--fed.rounds=3", "--run.progress=false"])
    assert "has no record of rounds [1] (deleted or lost)" in capsys.readouterr().out


def test_a_run_whose_weights_blow_up_ends_non_zero_with_last_pt_marked(tmp_path, cache_dir, monkeypatch, capsys):
    """lr = 10 (the bound) grows the smoke run's weights ~5x in round 1: with the threshold lowered to 2x for the
    test, the run stops there, exit 1, naming the round and optim.lr; last.pt is kept and marked; finetune warns."""
    import pretraining
    monkeypatch.setattr(pretraining, "RUNAWAY_RATIO", 2.0)
    monkeypatch.setattr(pretraining, "RUNAWAY_WARN", 1.5)
    out = tmp_path / "run"
    msg = one_line_error(pretrain.main, _args(out, cache_dir, "--optim.lr=10", "--fed.rounds=3", "--run.eval_every=0"))
    assert "round 1: the global weights' norm reached" in msg and "marked as a runaway" in msg
    assert "Likely cause: the learning rate: lower optim.lr (effective 2.5)" in msg
    assert "warning: round 1: the global weights' norm is" in capsys.readouterr().out
    ck = checkpoints.load_checkpoint(out / "last.pt")
    assert ck["round"] == 1 and ck["runaway"]["round"] == 1 and ck["runaway"]["weight_norm_ratio"] > 2
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["runaway"] is True
    res = finetune.main(["--ckpt", str(out), "--run.progress=false", "--eval.tasks=[image]", "--eval.protocols=[knn]",
                         "--eval.label_fractions=[1.0]", "--eval.max_test_images=400"])
    assert res["runaway"] is True and "is marked as a runaway run" in capsys.readouterr().out


def test_the_likely_cause_names_the_setting_that_caused_it():
    from engine import PretrainConfig
    from federation import FedConfig
    from losses import LossConfig
    from pretraining import likely_cause
    assert "fed.strategy.server_lr" in likely_cause(PretrainConfig(fed=FedConfig(aggregation="fedavgm", strategy={"server_lr": 5.0})))
    prox = PretrainConfig(fed=FedConfig(aggregation="fedprox", strategy={"prox_mu": 1e4}))
    assert "lower fed.strategy.prox_mu" in likely_cause(prox) and "optim.lr" not in likely_cause(prox)
    assert "raise loss.tau" in likely_cause(PretrainConfig(loss=LossConfig(tau=0.02)))
    assert "lower optim.lr" in likely_cause(PretrainConfig())


@pytest.mark.parametrize("script, argv, message", [
    ("scripts/rehearse.py", ["configs/smoke.yaml", "--clients", "0"], "argument --clients: 0 is out of range: expected 1 or more"),
    ("scripts/rehearse.py", ["configs/smoke.yaml", "--steps", "-1"], "argument --steps: -1 is out of range: expected 1 or more"),
    ("scripts/rehearse.py", ["configs/smoke.yaml", "--rounds", "0"], "argument --rounds: 0 is out of range"),
    ("scripts/rehearse.py", ["configs/smoke.yaml", "--tiers", "disk", "--repeats", "0"], "argument --repeats: 0 is out of range"),
    ("paper_tables.py", ["--seeds", "-1"], "argument --seeds: -1 is out of range: expected 0 to 9223372036854775807"),
    ("paper_tables.py", ["--seeds", "9223372036854775808"], "argument --seeds: 9223372036854775808 is out of range"),
    ("scripts/bench_engines.py", ["--repeats", "0"], "argument --repeats: 0 is out of range"),
    ("scripts/kill_resume.py", ["--kills", "0"], "argument --kills: 0 is out of range"),
])
def test_a_count_that_cannot_be_is_refused_before_any_work(script, argv, message, tmp_path):
    t0 = __import__("time").monotonic()
    p = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr.splitlines()[-1], p.stderr
    assert "Traceback" not in p.stderr and __import__("time").monotonic() - t0 < 60


def test_a_trimmed_mean_refusal_gives_only_advice_that_can_be_followed():
    from federation import FedConfig
    from settings import ConfigError
    with pytest.raises(ConfigError) as e:
        FedConfig(aggregation="trimmed_mean", clients_per_round=2, strategy={"trim_frac": 0.49}, clients=4)
    assert str(e.value).endswith("the plain mean): raise fed.clients_per_round to at least 3, or use fed.aggregation=median")
    FedConfig(aggregation="trimmed_mean", clients_per_round=3, strategy={"trim_frac": 0.49}, clients=4)  # that advice, followed
