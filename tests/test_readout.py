"""Read-outs that keep time (model.pool, eval.pool) and the rows that split "no gain": the centralised bound
(fed.budget_of, optim.reset_state) and the stream of epochs it trains on."""
import json

import pytest
import torch

import finetune
import pretrain
import verdicts
from engine import PretrainConfig
from helpers import ROOT, log_rounds, one_line_error, smoke_args
from local_update import stream_batches
from models import ModelConfig, build_model, pool_avg, pool_time
from settings import ConfigError, load_config

SHAPES = {"image": (1, 28, 28), "audio": (1, 32, 51)}


def test_time_pool_is_mean_and_max_over_time_of_channels_by_frequency():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g)  # (B, C, F, T)
    want = torch.stack([torch.tensor([x[b, c, f].mean() for c in range(3) for f in range(4)] +
                                     [x[b, c, f].max() for c in range(3) for f in range(4)]) for b in range(2)])
    assert torch.allclose(pool_time(x), want, atol=1e-6)
    # it forgets the order of time steps only, never of frequencies; global averaging forgets both
    t, f = x[..., torch.randperm(5, generator=g)], x[:, :, torch.tensor([1, 0, 2, 3])]
    assert torch.allclose(pool_time(t), pool_time(x), atol=1e-6) and not torch.allclose(pool_time(f), pool_time(x))
    assert torch.allclose(pool_avg(f), pool_avg(x), atol=1e-6)


def test_a_model_reads_each_modality_out_its_own_way():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet_tiny", width=8, pool={"audio": "time"}, head="per_modality")
    model = build_model(cfg, SHAPES).eval()
    # width 8 -> 64 channels; 32 mel bins -> 4 after three stride-2 stages: 2 x 64 x 4 = 512
    assert model.feat_dims == {"image": 64, "audio": 512}
    x = torch.randn(3, *SHAPES["audio"])
    fmap = model.trunk.layers(model.stems["audio"](x))
    assert torch.allclose(model.features(x, "audio"), pool_time(fmap), atol=1e-6)
    assert model(x, "audio").shape == (3, 128) and model(torch.randn(3, *SHAPES["image"]), "image").shape == (3, 128)
    model.set_pools({"audio": "avg"})  # eval.pool: the same trained map read another way
    assert model.feat_dims["audio"] == 64 and torch.allclose(model.features(x, "audio"), pool_avg(fmap), atol=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"pool": {"audio": "time"}}, "model.pool={'audio': 'time'} gives features of 64 (image), 512 (audio) dimensions, "
                                  "but one shared projection head needs one width: set model.head=per_modality"),
    ({"pool": "mean"}, "model.pool='mean': expected one of avg, time, flat"),
    ({"pool": {"video": "avg"}}, "model.pool (a modality)='video': expected one of image, audio"),
    ({"arch": "vit_micro", "pool": "time"}, "model.pool=time: model.arch=vit_micro reads out avg only"),
])
def test_a_bad_read_out_is_one_line_naming_the_choices(fields, message):
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(**{"arch": "resnet_tiny", "width": 8, **fields}), SHAPES)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_pool_is_a_mapping_on_the_command_line_too():
    cfg = load_config(PretrainConfig, ROOT / "configs" / "smoke.yaml",
                      ["--model.pool={image: avg, audio: time}", "--model.head=per_modality"])
    assert cfg.model.pool == {"image": "avg", "audio": "time"} and cfg.model.pool_for("audio") == "time"
    with pytest.raises(ConfigError, match=r"model.pool.audio=3: expected a string"):
        load_config(PretrainConfig, ROOT / "configs" / "smoke.yaml", ["--model.pool={audio: 3}"])


def test_the_stream_takes_each_sample_once_per_epoch_and_continues_where_it_stopped():
    n, sizes = 10, [4, 4, 4, 3, 6]  # 21 samples: two epochs and one more
    one = stream_batches(n, sizes, 0, seed=3, key="image", device="cpu")
    flat = torch.cat(one)
    assert [len(b) for b in one] == sizes
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:20])  # each epoch its own permutation
    rest = stream_batches(n, sizes[2:], 8, seed=3, key="image", device="cpu")  # a resumed run, two batches in
    assert all(torch.equal(a, b) for a, b in zip(one[2:], rest))
    assert not torch.equal(torch.cat(stream_batches(n, [10], 0, seed=3, key="audio", device="cpu")), flat[:10])


def test_a_centralised_bound_needs_one_client_and_a_matching_federation(tmp_path):
    base = ROOT / "configs" / "smoke.yaml"
    with pytest.raises(ConfigError, match=r"fed.budget_of=smoke.yaml trains one client .* needs fed.clients=1"):
        load_config(PretrainConfig, base, ["--fed.budget_of=smoke.yaml"])
    with pytest.raises(ConfigError, match=r"optim.reset_state=false carries one optimiser's momentum .* fed.clients=2"):
        load_config(PretrainConfig, base, ["--optim.reset_state=false"])
    cen = load_config(PretrainConfig, ROOT / "configs" / "centralised.yaml")
    ref = load_config(PretrainConfig, ROOT / "configs" / "default.yaml")
    assert (cen.fed.clients, cen.optim.reset_state, cen.fed.rounds, cen.optim.peak_lr) == (1, False, ref.fed.rounds,
                                                                                          ref.optim.peak_lr)
    assert load_config(PretrainConfig, ROOT / "configs" / "iid.yaml").fed.partition == "iid"


@pytest.mark.slow
def test_the_centralised_bound_trains_the_federations_exact_batches_and_resumes_exactly(tmp_path, cache_dir):
    quiet = ["--fed.rounds=2", "--run.eval_every=0", "--run.final_probe=false"]
    fed, cen, half = tmp_path / "fed", tmp_path / "cen", tmp_path / "half"
    pretrain.main(smoke_args(fed, cache_dir, *quiet))
    central = ["--fed.clients=1", "--fed.clients_per_round=1", "--optim.reset_state=false",
               f"--fed.budget_of={fed / 'config.yaml'}"]
    pretrain.main(smoke_args(cen, cache_dir, *quiet, *central))
    rec = {d: [json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines()][1:] for d in (fed, cen)}
    keys = ("round", "lr", "steps", "samples_image", "samples_audio")
    assert [[r[k] for k in keys] for r in rec[cen]] == [[r[k] for k in keys] for r in rec[fed]]
    assert rec[fed][0]["samples_image"] > 0 and rec[fed][0]["samples_audio"] > 0
    assert [len(r["clients"]) for r in rec[fed]] == [2, 2] and [r["clients"] for r in rec[cen]] == [[0], [0]]
    # the momentum carries over rounds, so it is in last.pt and a resumed run ends on the same bits
    pretrain.main(smoke_args(half, cache_dir, *quiet[1:], "--fed.rounds=1", *central))
    pretrain.main(["--resume", str(half), "--fed.rounds=2"])
    a, b = torch.load(cen / "last.pt", weights_only=True), torch.load(half / "last.pt", weights_only=True)
    assert a["optimizer"]["state"] and log_rounds(half) == [0, 1, 2]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    msg = one_line_error(pretrain.main, smoke_args(tmp_path / "x", cache_dir, *central[:3], "--fed.budget_of=default.yaml"))
    assert "fed.budget_of=default.yaml: a centralised bound must see the same data and optimiser" in msg
    assert "optim.lr: 0.2 -> 0.05" in msg


@pytest.mark.slow
def test_time_pooling_runs_end_to_end_through_finetune(tmp_path, cache_dir):
    out = tmp_path / "run"
    pretrain.main(smoke_args(out, cache_dir, "--model.pool={audio: time}", "--model.head=per_modality",
                             "--run.eval_every=0"))
    ev = ["--eval.tasks=[audio, paired]", "--eval.protocols=[linear, knn]", "--eval.label_fractions=[1.0]",
          "--eval.wd_grid=[1e-3]"]
    res = downstream_rows(out, tmp_path / "ev", ev)
    assert {(r["task"], r["features"], r["dim"]) for r in res} == {
        ("audio", "audio", 512), ("paired", "image", 64), ("paired", "audio", 512), ("paired", "fused", 576),
        ("paired", "fused_random_audio", 576)}
    # eval.pool reads the same trained map out another way: global averaging gives the trunk's 64 channels
    assert {r["dim"] for r in downstream_rows(out, tmp_path / "ev2", ["--eval.tasks=[audio]", *ev[1:], "--eval.pool=avg"])} == {64}
    msg = one_line_error(finetune.main, ["--ckpt", str(out), f"--run.out_dir={tmp_path}", "--eval.pool=median"])
    assert msg == "error: eval.pool='median': expected one of avg, time, flat"


def downstream_rows(run, out, overrides) -> list[dict]:
    finetune.main(["--ckpt", str(run), f"--run.out_dir={out}", "--eval.raw_input=false", "--eval.max_test_images=400",
                   *overrides])
    return json.loads((out / "results.json").read_text())["rows"]


def _results(accs: dict) -> dict:
    """results.json-like objects: {variant: [per seed {rows}]} from {variant: (image accs, audio accs)} at 100%."""
    return {v: [{"seed": s, "rows": [{"task": m, "features": m, "protocol": "linear", "label_frac": 1.0, "acc": a[i][s]}
                                     for i, m in enumerate(("image", "audio"))]} for s in range(3)]
            for v, a in accs.items()}


def test_the_claims_and_the_decomposition_are_computed_from_the_seeds():
    res = _results({"fssuavl": ([80, 81, 82], [90, 91, 89]), "raw_input": ([80, 80.5, 81.5], [85, 85.2, 84.8]),
                    "centralised": ([85, 86, 85.5], [92, 92.5, 91.5]), "iid": ([84, 85, 84.5], [91, 91.2, 90.8])})
    rows = {r["claim"]: r for r in verdicts.claims_table(res)}
    assert rows["FSSUAVL beats the raw pixels, image, 100% labels"]["verdict"] == "no: a tie"
    assert rows["FSSUAVL beats the raw log-mel, audio, 100% labels"]["verdict"] == "**yes**"
    gap = rows["federated FSSUAVL beats its centralised bound ('below' is the federation's gap), image, 100% labels"]
    assert gap["verdict"] == "**no: below**" and gap["difference"] == -4.5
    from significance import welch
    assert gap["Welch p"] == float(f"{welch([80, 81, 82], [85, 86, 85.5])[2]:.3g}")
    lines = verdicts.decomposition(res)
    assert [ln.split(":")[0] for ln in lines[:3]] == ["Image, linear probe, 100% labels (recipe)",
                                                     "Image, linear probe, 100% labels (federation)",
                                                     "Image, linear probe, 100% labels (heterogeneity)"]
    assert "**centralised bound (one client, all data, same budget) beats raw input (standardised)**" in lines[0]
