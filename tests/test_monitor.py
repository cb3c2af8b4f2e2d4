"""The monitor and the bar (issue 18): representation diagnostics on hand-made features, kNN on standardised
features, the raw-input baseline through the very probe and kNN the models get, the TensorBoard mirror of the log,
and Spearman's rho for the monitor/probe agreement."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pretrain
from data import ModalityData
from diagnostics import alignment, centroid_gap, effective_rank, modality_separability, uniformity
from downstream import FinetuneConfig, evaluate_tasks, markdown_table
from evaluation import RawInput, extract_features, knn_accuracy, knn_predict, label_subset, linear_probe, standardize
from helpers import smoke_args
from settings import build_dataclass
from significance import spearman


def orthonormal_centred(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) orthonormal columns, each orthogonal to the all-ones vector (so centring leaves them as they are)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = a - a.mean(0, keepdim=True)
    return torch.linalg.qr(a).Q


def test_effective_rank_counts_the_spread_dimensions():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 16, generator=g)
    assert effective_rank(torch.randn(200, 1, generator=g) * v + 3.0) == pytest.approx(1.0, abs=1e-4)  # collapsed to a line
    assert effective_rank(torch.ones(50, 16) * 2.0) == 1.0  # every sample the same point
    q = orthonormal_centred(100, 5)
    assert effective_rank(q @ torch.eye(5, 32, dtype=torch.float64)) == pytest.approx(5.0, rel=1e-9)  # 5 equal singular values
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = s / s.sum()  # singular values 3 and 1: exp(entropy of (0.75, 0.25)), computed by hand
    assert effective_rank(orthonormal_centred(60, 2) * s) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)


def test_alignment_and_uniformity_on_handmade_embeddings():
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    assert alignment(z, z * 5.0) == pytest.approx(0.0, abs=1e-12)   # the same direction: perfectly aligned
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-9)         # antipodal views: |2 z|^2 = 4 on the sphere
    assert uniformity(torch.ones(10, 4)) == pytest.approx(0.0, abs=1e-12)  # all collapsed: exp(0) = 1 for every pair
    pts = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity(pts) == pytest.approx(-8.0, rel=1e-9)         # one pair at squared distance 4: log exp(-2*4)
    spread = F.normalize(torch.randn(400, 64, generator=torch.Generator().manual_seed(2)), dim=1)
    assert uniformity(spread) < uniformity(spread[:, :2]) < 0       # more spread, lower


def test_modality_gap_is_zero_for_identical_modalities_and_large_for_separated_ones():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(200, 16, generator=g)
    assert centroid_gap(h, h.clone()) == pytest.approx(0.0, abs=1e-12)
    assert modality_separability(h, h.clone()) == pytest.approx(50.0)  # identical rows: every test pair predicted alike
    shifted = h + torch.cat([torch.full((200, 1), 10.0), torch.zeros(200, 15)], dim=1)
    assert modality_separability(h, shifted) == 100.0
    a, b = torch.tensor([[1.0, 0.0]]).repeat(5, 1), torch.tensor([[0.0, 1.0]]).repeat(5, 1)
    assert centroid_gap(a, b) == pytest.approx(math.sqrt(2.0), rel=1e-9)


def labelled(n_train=120, n_test=60, shape=(1, 6, 6), classes=3, seed=0) -> ModalityData:
    """Class-dependent uint8 images: the class sets the mean brightness of one quadrant."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.arange(n) % classes
        x = torch.randint(0, 120, (n, *shape), generator=g).float()
        for c in range(classes):
            x[y == c, :, : 3 * (c % 2 + 1) // 2 + 1, c:] += 100
        return x.clamp(0, 255).to(torch.uint8), y
    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return ModalityData(xtr, ytr, xte, yte, [str(c) for c in range(classes)], torch.tensor([0.4]), torch.tensor([0.3]))


def test_knn_monitor_standardises_features_with_the_banks_statistics():
    md = labelled()
    raw = RawInput({"image": md.shape})
    got = knn_accuracy(raw, md, "image", k=5)
    bank = ((md.train_x.float() / 255 - 0.4) / 0.3).flatten(1)  # the input, normalised as in pretraining
    q = ((md.test_x.float() / 255 - 0.4) / 0.3).flatten(1)
    mu, sd = bank.mean(0), bank.std(0).clamp_min(1e-6)
    pred = knn_predict(F.normalize((bank - mu) / sd, dim=1), md.train_y, F.normalize((q - mu) / sd, dim=1), 3, k=5, t=0.1)
    assert got == pytest.approx(100.0 * (pred == md.test_y).float().mean().item())
    b2, q2 = standardize(bank, q)
    assert torch.allclose(b2.norm(dim=1), torch.ones(len(b2))) and torch.allclose(b2.mean(0) * 0, torch.zeros(36))


def test_raw_input_rows_use_the_same_splits_and_probe_as_the_model_rows():
    data = {"image": labelled(seed=4)}
    cfg = build_dataclass(FinetuneConfig, {"eval": {"tasks": ["image"], "protocols": ["linear", "knn"],
                                                    "label_fractions": [0.5, 1.0], "wd_grid": [1e-3, 1e-2]},
                                           "run": {"out_dir": "", "seed": 7}})
    raw = RawInput({"image": data["image"].shape})
    rows = evaluate_tasks(raw, data, cfg, "cpu", log=lambda s: None)
    tr, ytr = extract_features(raw, data["image"], "train", "image", normalize=False)
    te, yte = extract_features(raw, data["image"], "test", "image", normalize=False)
    assert tr.shape == (120, 36)  # the input itself, flattened
    for frac in (0.5, 1.0):
        sub = label_subset(ytr, frac, 7)  # the labelled subset the model rows of this seed get
        want = linear_probe(tr[sub], ytr[sub], te, yte, 3, seed=7, val_frac=0.1, wd_grid=(1e-3, 1e-2), iters=100)["acc"]
        got = next(r for r in rows if r["protocol"] == "linear" and r["label_frac"] == frac)
        assert got["acc"] == pytest.approx(round(want, 3)) and got["n_train"] == len(sub) and got["n_test"] == 60
    table = markdown_table(rows, "t", rows)
    assert table.index("| image | image | 36 | linear |") < table.index("| image | image (raw input) | 36 | linear |")


def test_spearman_against_ranks_computed_by_numpy():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [5.0, 6.0, 7.0, 8.0, 7.0, 1.0]
    ry = np.array([2, 3, 4.5, 6, 4.5, 1])  # the tie at 7 takes the mean of ranks 4 and 5
    assert spearman(x, y) == pytest.approx(np.corrcoef(np.arange(1, 7), ry)[0, 1], rel=1e-12)
    assert spearman(x, [v * v for v in x]) == pytest.approx(1.0) and spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal-length"):
        spearman([1.0], [2.0])


@pytest.mark.slow
@pytest.mark.usefixtures("in_root")
def test_log_holds_monitor_diagnostics_and_the_raw_input_and_tensorboard_mirrors_it(tmp_path, cache_dir):
    off = tmp_path / "off"
    pretrain.main(smoke_args(off, cache_dir, "--run.eval_every=0"))
    assert not (off / "tensorboard").exists()  # off by default
    on = tmp_path / "on"
    pretrain.main(smoke_args(on, cache_dir, "--run.eval_every=0", "--run.tensorboard=true"))
    log = [json.loads(ln) for ln in (on / "log.jsonl").read_text().splitlines()]
    for m in ("image", "audio"):
        assert {f"raw_probe_{m}", f"raw_knn_{m}"} <= set(log[0]) and f"raw_probe_{m}" not in log[1]
        for rec in log:
            assert {f"knn_{m}", f"probe_{m}", f"erank_{m}", f"align_{m}", f"unif_{m}"} <= set(rec)
            assert 1.0 <= rec[f"erank_{m}"] <= 64 and rec[f"align_{m}"] >= 0 and rec[f"unif_{m}"] <= 0
    assert 0 <= log[1]["gap_image_audio"] <= 2 and 0 <= log[1]["gap_acc_image_audio"] <= 100
    # the raw input does not depend on the model: the same in both runs, and what the summary compares against
    assert [json.loads((off / "log.jsonl").read_text().splitlines()[0])[f"raw_probe_{m}"] for m in ("image", "audio")] \
        == [log[0]["raw_probe_image"], log[0]["raw_probe_audio"]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(on / "tensorboard"))
    acc.Reload()
    for key in ("knn_image", "probe_audio", "erank_image", "loss_image", "raw_probe_image", "gap_acc_image_audio"):
        events = acc.Scalars(key.replace("_", "/", 1))
        want = [(rec["round"], rec[key]) for rec in log if key in rec]
        assert [(e.step, e.value) for e in events] == [(r, pytest.approx(v, rel=1e-6)) for r, v in want]
