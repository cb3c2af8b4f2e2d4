"""Downstream evaluation: probe, kNN, pairing, checkpoint loading, and an end-to-end finetune.py run."""
import json

import pytest
import torch

import checkpoints
import downstream
import finetune
import pretrain
from checkpoints import CheckpointError
from evaluation import RawInput, fuse, knn_predict, label_subset, linear_probe, load_backbone, make_pairs
from helpers import ROOT, TINY_DATA


def test_linear_probe_recovers_a_linearly_separable_problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, generator=g)
    x = torch.randn(600, 16, generator=g)
    y = (x @ w.t()).argmax(1)                 # separable by construction
    xt = torch.randn(300, 16, generator=g)
    yt = (xt @ w.t()).argmax(1)
    res = linear_probe(x, y, xt, yt, 3, seed=0, wd_grid=(1e-5, 1e-2))
    assert res["acc"] > 97 and res["wd"] in (1e-5, 1e-2)
    noise = linear_probe(x, torch.randint(0, 3, (600,), generator=g), xt, yt, 3, seed=0)
    assert noise["acc"] < 60                  # random labels: near chance


def test_knn_predict_weighted_vote():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    y = torch.tensor([0, 0, 1])
    q = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0], [1.0, 0.05]]), dim=1)
    assert knn_predict(bank, y, q, 2, k=1).tolist() == [1, 0]
    # k=3: two weak class-0 votes vs one strong class-1 vote; a low temperature lets the nearest win
    assert knn_predict(bank, y, q[:1], 2, k=3, t=0.05).tolist() == [1]


def test_label_subset_is_stratified_and_reproducible():
    y = torch.arange(10).repeat_interleave(50)
    s = label_subset(y, 0.1, seed=1)
    assert torch.equal(s, label_subset(y, 0.1, seed=1))
    assert torch.bincount(y[s]).tolist() == [5] * 10
    assert torch.bincount(y[label_subset(y, 0.001, seed=1)]).tolist() == [1] * 10  # at least one per class
    assert len(label_subset(y, 1.0, 0)) == 500


def test_pairs_match_classes_and_fused_width():
    iy = torch.tensor([0, 1, 2, 1, 0])
    ay = torch.tensor([2, 0, 1, 1, 15, 0])
    p = make_pairs(iy, ay, seed=0)
    assert torch.equal(ay[p], iy)
    h = fuse(torch.randn(5, 16), torch.randn(5, 16))
    assert h.shape == (5, 32)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain.main(["configs/smoke.yaml", f"--run.out_dir={out}", f"--data.cache_dir={cache_dir}",
                   "--run.progress=false", *TINY_DATA])
    return out / "last.pt"


def test_loader_takes_backbone_and_rejects_wrong_keys(pretrained, tmp_path):
    model, ck = load_backbone(pretrained)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ck["model"][k]) for k in sd if k.startswith(("stems.", "trunk.")))
    bad = {k: v for k, v in ck.items() if k not in ("sha256", "digest")}  # keys renamed, then signed again
    bad["model"] = {("trunk.renamed" if k == "trunk.layers.0.conv1.weight" else k): v for k, v in ck["model"].items()}
    checkpoints.save_checkpoint(bad, tmp_path / "bad.pt", keep_previous=False)
    with pytest.raises(CheckpointError, match=r"missing \['trunk.layers.0.conv1.weight'\].*unexpected \['trunk.renamed'\]"):
        load_backbone(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pt")
    rnd, _ = load_backbone(pretrained, random_init=True)
    assert not torch.equal(rnd.state_dict()["trunk.layers.0.conv1.weight"], sd["trunk.layers.0.conv1.weight"])


@pytest.mark.slow
def test_finetune_end_to_end_and_backbone_unchanged(pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = {k: v.clone() for k, v in load_backbone(pretrained)[0].state_dict().items()}
    captured = {}
    real_evaluate = downstream.evaluate_tasks

    def spy(model, *a, **kw):
        rows = real_evaluate(model, *a, **kw)
        captured["raw" if isinstance(model, RawInput) else "after"] = {k: v.clone() for k, v in model.state_dict().items()}
        captured.setdefault("rows_of", []).append((type(model).__name__, rows))
        return rows
    monkeypatch.setattr(downstream, "evaluate_tasks", spy)
    res = finetune.main(["--ckpt", str(pretrained.parent), f"--run.out_dir={tmp_path}", "--run.progress=false",
                         "--eval.label_fractions=[0.1, 1.0]", "--eval.protocols=[linear, knn, finetune]",
                         "--eval.finetune_epochs=1", "--eval.max_train_images=300", "--eval.max_test_images=400", "--eval.wd_grid=[1e-4, 1e-2]"])
    # the frozen-feature protocols (and fine-tuning, which works on a copy) leave the backbone unchanged
    assert all(torch.equal(before[k], captured["after"][k]) for k in before)
    rows = res["rows"]
    kinds = {(r["task"], r["features"], r["protocol"]) for r in rows}
    assert ("paired", "fused", "linear") in kinds and ("audio", "audio", "finetune") in kinds
    assert ("paired", "fused", "finetune") not in kinds
    for r in rows:  # an accuracy is a count of correct test predictions over n_test (rounded to 3 decimals)
        correct = r["acc"] * r["n_test"] / 100
        assert abs(correct - round(correct)) < 1e-3 * r["n_test"] / 100 + 1e-6 and 0 <= round(correct) <= r["n_test"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == rows and saved["raw_input_rows"] == dict(captured["rows_of"])["RawInput"]
    raw_kinds = {(r["task"], r["features"], r["protocol"]) for r in saved["raw_input_rows"]}
    assert raw_kinds == {k for k in kinds if k[2] != "finetune"}  # the bar beside every frozen-feature row
    md = (tmp_path / "results.md").read_text()
    # each row with the width of its features: two 64-d halves fused; the raw 784 pixels and 32 x 51 log-mel bins
    assert "| paired | fused | 128 | linear |" in md and "| paired | fused (raw input) | 2416 | linear |" in md
    rnd = finetune.main(["--ckpt", str(pretrained), "--random-init", f"--run.out_dir={tmp_path}",
                         "--run.progress=false", "--eval.label_fractions=[1.0]", "--eval.tasks=[image]",
                         "--eval.max_train_images=300", "--eval.max_test_images=400", "--eval.protocols=[knn]"])
    assert (tmp_path / "results_random_init.json").exists() and len(rnd["rows"]) == 1


def test_finetune_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        finetune.main(["--ckpt", str(tmp_path / "missing.pt")])
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="unreadable"):
        finetune.main(["--ckpt", str(tmp_path / "x.pt")])


def test_control_pairs_are_uninformative_and_fusion_normalises_halves():
    iy = torch.arange(10).repeat_interleave(200)
    ay = torch.arange(20).repeat(30)  # 20 words, the first 10 are the image classes
    ctrl = make_pairs(iy, ay, seed=0, informative=False)
    assert (ctrl >= 0).all() and (ay[ctrl] < 10).all()
    agree = (ay[ctrl] == iy).float().mean().item()
    assert 0.05 < agree < 0.15  # about 1 in 10: the clip's class is independent of the image
    h = fuse(torch.randn(5, 16) * 100, torch.randn(5, 8))
    assert torch.allclose(h[:, :16].norm(dim=1), torch.ones(5)) and torch.allclose(h[:, 16:].norm(dim=1), torch.ones(5))


@pytest.mark.slow
def test_results_go_beside_the_checkpoint_when_no_out_dir_is_given(pretrained, monkeypatch, tmp_path):
    """A run section without out_dir (here from --run.progress=false) must not send the results to runs/default."""
    monkeypatch.chdir(tmp_path)
    finetune.main(["--ckpt", str(pretrained), "--run.progress=false", "--eval.tasks=[image]", "--eval.protocols=[knn]",
                   "--eval.label_fractions=[1.0]", "--eval.max_test_images=400"])
    assert (pretrained.parent / "results.json").is_file() and not (tmp_path / "runs").exists()
