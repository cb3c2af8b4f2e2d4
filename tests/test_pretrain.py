"""End-to-end runs of pretrain.py on a tiny AV-Fashion cache."""
import json

import pytest
import torch
import yaml

import models
import pretrain
from helpers import TINY_DATA


def run(tmp_path, cache_dir, *extra, name="run"):
    out = tmp_path / name
    args = ["configs/smoke.yaml", f"--run.out_dir={out}", f"--data.cache_dir={cache_dir}", "--run.progress=false",
            *TINY_DATA, *extra]
    return out, pretrain.main(args)


pytestmark = pytest.mark.usefixtures("in_root")


def test_smoke_run_writes_config_log_and_checkpoint(tmp_path, cache_dir):
    out, res = run(tmp_path, cache_dir)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["fed"]["rounds"] == 1 and cfg["data"]["n_voices"] == 12
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [ln["round"] for ln in lines] == [0, 1]
    assert {"loss_image", "loss_audio", "lr", "seconds", "clients", "knn_image", "knn_audio"} <= set(lines[1])
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["round"] == 1 and ck["config"] == cfg
    model = models.build_model(models.ModelConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                                         for k, v in cfg["model"].items()}),
                                 {m: tuple(s) for m, s in ck["input_shapes"].items()})
    model.load_state_dict(ck["model"])  # strict: the checkpoint holds exactly the model's keys
    correct = lines[1]["knn_image"] * 128 / 100  # kNN over the 128 stratified test queries of TINY_DATA
    assert correct == pytest.approx(round(correct), abs=1e-6) and 0 <= round(correct) <= 128


@pytest.mark.slow
def test_single_modality_baselines(tmp_path, cache_dir):
    out, res = run(tmp_path, cache_dir, "--data.modalities=[audio]", name="audio_only")
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "loss_audio" in last and "loss_image" not in last
    ck = torch.load(out / "last.pt", weights_only=True)
    assert not any(k.startswith("stems.image") for k in ck["model"])


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, cache_dir):
    import shutil
    common = ["--fed.rounds=3", "--run.deterministic=true", "--fed.order=sum", "--fed.cross_modal_negatives=true"]
    full, _ = run(tmp_path, cache_dir, *common, name="full")
    # a run stopped after round 2 of 3: its directory holds the round-2 checkpoint (kept as last.pt.prev)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "last.pt.prev", cut / "last.pt")
    shutil.copy(full / "log.jsonl", cut / "log.jsonl")
    assert torch.load(cut / "last.pt", weights_only=True)["round"] == 2
    pretrain.main(["--resume", str(cut), "--run.progress=false"])
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert b["round"] == 3 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit-identical
    log = [json.loads(ln)["round"] for ln in (cut / "log.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2, 3]  # round 3 logged once


@pytest.mark.slow
def test_resume_refuses_changed_config(tmp_path, cache_dir, capsys):
    out, _ = run(tmp_path, cache_dir)
    with pytest.raises(SystemExit, match="optim.lr"):
        pretrain.main(["--resume", str(out), "--optim.lr=0.5", "--run.progress=false"])


def test_bad_cli_input_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'fed.roundz'"):
        pretrain.main(["configs/smoke.yaml", "--fed.roundz=3"])
    with pytest.raises(SystemExit, match="fed.rounds='x': expected an integer"):
        pretrain.main(["configs/smoke.yaml", "--fed.rounds=x"])
    with pytest.raises(SystemExit, match="fed.clients_per_round=3 is larger"):
        pretrain.main(["configs/smoke.yaml", "--fed.clients_per_round=3"])


def test_show_partition_prints_counts(tmp_path, cache_dir, capsys):
    pretrain.main(["configs/smoke.yaml", f"--data.cache_dir={cache_dir}", *TINY_DATA, "--show-partition",
                   "--fed.partition=natural"])
    out = capsys.readouterr().out
    assert "image: client | n | per-class counts (10 classes)" in out and "audio: client" in out
    assert not (tmp_path / "run").exists()


def _log(out):
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_separate_models_train_on_fssuavls_exact_clients_rounds_and_data(tmp_path, cache_dir):
    """The fair baselines: each round the same sampled client ids as FSSUAVL; the image-only model trains
    exactly the sampled clients holding images, on the same number of image samples (same indices), and
    the others sit out."""
    fed = ["--fed.clients=6", "--fed.clients_per_round=3", "--fed.rounds=3", "--fed.modality_fractions=[0.4, 0.4, 0.2]",
           "--optim.batch_size=32", "--run.final_probe=false", "--run.eval_every=0"]
    both, _ = run(tmp_path, cache_dir, *fed, name="both")
    logs = {"both": _log(both)[1:]}
    for m in ("image", "audio"):
        out, _ = run(tmp_path, cache_dir, *fed, f"--data.modalities=[{m}]", name=m)
        logs[m] = _log(out)[1:]
    for r_both, r_img, r_aud in zip(logs["both"], logs["image"], logs["audio"]):
        assert r_both["clients"] == r_img["clients"] == r_aud["clients"]
        for m, rec in (("image", r_img), ("audio", r_aud)):
            holders = {c["client"]: c[f"samples_{m}"] for c in r_both["per_client"] if c[f"samples_{m}"] > 0}
            assert {c["client"]: c[f"samples_{m}"] for c in rec["per_client"]} == holders
            assert set(rec.get("sat_out", [])) == set(rec["clients"]) - set(holders)
            assert rec[f"samples_{m}"] == r_both[f"samples_{m}"]


@pytest.mark.slow
def test_a_round_logs_what_moved_and_what_ran(tmp_path, cache_dir):
    out, res = run(tmp_path, cache_dir)
    rec = _log(out)[1]
    ck = torch.load(out / "last.pt", weights_only=True)
    per_model = sum(v.numel() * v.element_size() for v in ck["model"].values())
    assert rec["bytes_down"] == 2 * per_model and rec["bytes_up"] == 2 * per_model  # smoke: 2 clients hold both
    assert rec["steps"] == sum(c["steps"] for c in rec["per_client"])
    flops = ck["forward_flops"]
    assert rec["fwd_flops"] == 2 * (rec["samples_image"] * flops["image"] + rec["samples_audio"] * flops["audio"])
    hist = res["history"]
    assert {"probe_image", "probe_audio"} <= set(hist[0]) and {"probe_image", "probe_audio"} <= set(hist[-1])


@pytest.mark.slow
def test_the_same_seed_twice_gives_the_same_weights_with_the_cpu_default(tmp_path, cache_dir):
    """run.deterministic is left at its default (null: on for CPU): one seed, one answer."""
    finals = []
    for name in ("a", "b"):
        out, _ = run(tmp_path, cache_dir, "--fed.rounds=2", "--run.final_probe=false", "--run.eval_every=0", name=name)
        assert yaml.safe_load((out / "config.yaml").read_text())["run"]["deterministic"] is None
        finals.append(torch.load(out / "last.pt", weights_only=True)["model"])
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
