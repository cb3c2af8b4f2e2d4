import math

import pytest
import torch

from federation import ClientUpdate, FedConfig, is_shared, run_round, sample_clients
from local_update import OptimConfig, batch_schedule, lr_at
from settings import ConfigError
from strategies import fedavg


def test_fedavg_matches_hand_computed_average():
    s1 = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(7)}
    s2 = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}
    out = fedavg([s1, s2], [1, 3])
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    # integer buffers are copied (from the first client), never averaged
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == 7


def test_fedavg_keeps_dtype_and_is_exact_for_equal_weights():
    s = [{"w": torch.full((3,), v, dtype=torch.float16)} for v in (1.0, 2.0, 4.0)]
    out = fedavg(s, [2, 2, 2])
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.full((3,), 7 / 3, dtype=torch.float16))


def _dummy_update(values, losses=None):
    """local_update stand-in: client c returns weight vector values[c] and n = c + 1 samples."""
    def f(cid):
        loss = (losses or {}).get(cid, 1.0)
        return ClientUpdate(cid, {"w": torch.tensor([values[cid]]), "heads.shared.w": torch.tensor([values[cid]])},
                            {"image": cid + 1}, {"loss_image": loss, "steps": 1})
    return f


def test_run_round_weighted_average_and_head_sharing():
    g = {"w": torch.tensor([0.0]), "heads.shared.w": torch.tensor([0.0])}
    new, metrics, rejected = run_round(g, [0, 1], _dummy_update({0: 1.0, 1: 4.0}))
    assert rejected == [] and len(metrics) == 2
    assert new["w"].item() == pytest.approx((1 * 1.0 + 2 * 4.0) / 3)
    # a head that is not shared stays at the global value on the server
    new, _, _ = run_round(g, [0, 1], _dummy_update({0: 1.0, 1: 4.0}), share=lambda k: is_shared(k, False))
    assert new["heads.shared.w"].item() == 0.0 and new["w"].item() != 0.0


def test_run_round_rejects_non_finite_clients():
    g = {"w": torch.tensor([0.0]), "heads.shared.w": torch.tensor([0.0])}
    new, metrics, rejected = run_round(g, [0, 1, 2], _dummy_update({0: 1.0, 1: math.nan, 2: 3.0}, {2: math.inf}))
    assert rejected == [1, 2]
    assert new["w"].item() == pytest.approx(1.0)  # only client 0 reaches the average
    new, metrics, rejected = run_round(g, [1], _dummy_update({1: math.nan}))
    assert rejected == [1] and metrics == [] and new["w"].item() == 0.0  # all rejected: global kept


def test_client_sampling_is_a_pure_function_of_seed_and_round():
    a = sample_clients(list(range(100)), 10, seed=3, round_idx=5)
    assert a == sample_clients(list(range(100)), 10, seed=3, round_idx=5)
    assert len(set(a)) == 10 and a != sample_clients(list(range(100)), 10, seed=3, round_idx=6)
    assert sample_clients([4, 9], 10, 0, 1) == [4, 9]


def test_lr_schedule_warmup_cosine():
    cfg = OptimConfig(lr=0.1, batch_size=512, warmup_rounds=1, min_lr_frac=0.0)
    peak = 0.2
    assert lr_at(1, cfg, 11) == pytest.approx(peak / 2)
    assert lr_at(2, cfg, 11) == pytest.approx(peak)
    assert lr_at(7, cfg, 11) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert OptimConfig(schedule="constant").peak_lr == lr_at(50, OptimConfig(schedule="constant"), 100)


def test_batch_schedule():
    alt = batch_schedule({"image": 1000, "audio": 300}, 100, "alternate")
    assert sum(s == ("image",) for s in alt) == 10 and sum(s == ("audio",) for s in alt) == 3
    assert alt[0] == ("image",) and ("audio",) in alt[:5]  # interleaved, not all images first
    assert batch_schedule({"image": 1000, "audio": 300}, 100, "sum") == [("image", "audio")] * 10
    assert batch_schedule({"image": 50}, 100, "alternate") == [("image",)]  # a small client: one batch
    assert batch_schedule({"image": 1}, 100, "alternate") == []            # NT-Xent needs 2 instances


@pytest.mark.parametrize("kwargs, key", [
    ({"clients": 5, "clients_per_round": 6}, "fed.clients_per_round"),
    ({"alpha": 0.0}, "fed.alpha"),
    ({"order": "random"}, "fed.order"),
    ({"cross_modal_negatives": True}, "fed.cross_modal_negatives"),
    ({"modality_fractions": (0.5, -0.1, 0.6)}, "fed.modality_fractions"),
])
def test_fed_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FedConfig(**kwargs)


def test_modality_weighting_ignores_untouched_keys():
    """An image-only client returns the audio stem and audio BN statistics unchanged: with
    weighting='modality' they are averaged over the audio clients only; shared keys over everyone."""
    g = {"trunk.w": torch.tensor([0.0]), "stems.audio.w": torch.tensor([0.0]),
         "trunk.bn.running_mean_audio": torch.tensor([0.0]), "trunk.bn.num_batches_tracked_audio": torch.tensor(0)}
    updates = {
        0: ClientUpdate(0, {"trunk.w": torch.tensor([1.0]), "stems.audio.w": torch.tensor([0.0]),
                            "trunk.bn.running_mean_audio": torch.tensor([0.0]),
                            "trunk.bn.num_batches_tracked_audio": torch.tensor(0)}, {"image": 30}),
        1: ClientUpdate(1, {"trunk.w": torch.tensor([4.0]), "stems.audio.w": torch.tensor([2.0]),
                            "trunk.bn.running_mean_audio": torch.tensor([5.0]),
                            "trunk.bn.num_batches_tracked_audio": torch.tensor(3)}, {"audio": 10}),
    }
    new, _, _ = run_round(g, [0, 1], updates.__getitem__, weighting="modality")
    assert new["trunk.w"].item() == pytest.approx((30 * 1 + 10 * 4) / 40)
    assert new["stems.audio.w"].item() == 2.0 and new["trunk.bn.running_mean_audio"].item() == 5.0
    assert new["trunk.bn.num_batches_tracked_audio"].item() == 3
    plain, _, _ = run_round(g, [0, 1], updates.__getitem__, weighting="total")
    assert plain["stems.audio.w"].item() == pytest.approx(10 * 2 / 40)  # plain FedAvg dilutes it


def test_coordinate_median_and_trimmed_mean_by_hand():
    from strategies import CoordinateRobust
    vals = [[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 1.0], [4.0, 2.0]]  # client 2 is an outlier in coord 0
    states = [{"w": torch.tensor(v), "n": torch.tensor(i)} for i, v in enumerate(vals)]
    med = CoordinateRobust("median")
    for s in states:
        med.add(s, 1.0)
    out = med.result(states[0])
    assert out["w"].tolist() == [3.0, 1.0] and out["n"].item() == 0  # sorted coords: [1,2,3,4,100], [-5,0,1,2,10]
    even = CoordinateRobust("median")
    for s in states[:4]:
        even.add(s, 1.0)
    assert even.result(states[0])["w"].tolist() == [2.5, 0.5]       # mean of the two middle values
    tm = CoordinateRobust("trimmed_mean", trim_frac=0.2)             # cut 1 of 5 at each end
    for s in states:
        tm.add(s, 1.0)
    assert torch.allclose(tm.result(states[0])["w"], torch.tensor([(2 + 3 + 4) / 3, (0 + 1 + 2) / 3]))


def test_robust_round_resists_a_poisoned_client():
    from strategies import make_strategy
    g = {"w": torch.tensor([0.0]), "heads.shared.w": torch.tensor([0.0])}
    upd = _dummy_update({0: 1.0, 1: 1.1, 2: 1e6})                  # client 2 sends a huge but finite update
    fedavg_w = run_round(g, [0, 1, 2], upd)[0]["w"].item()
    median_w = run_round(g, [0, 1, 2], upd, strategy=make_strategy(FedConfig(aggregation="median")))[0]["w"].item()
    assert fedavg_w > 1e5 and median_w == pytest.approx(1.1)


def test_measured_bytes_are_the_aggregated_tensors():
    """bytes_up counts exactly the tensors the server folds in for that client: under weighting='modality' an
    image-only client's audio stem (weight 0) is not counted; bytes_down is every shared global tensor."""
    g = {"trunk.w": torch.zeros(10), "stems.audio.w": torch.zeros(3, dtype=torch.float64),
         "stems.image.w": torch.zeros(4, dtype=torch.float16), "heads.shared.w": torch.zeros(5)}
    state = {k: v + 1 for k, v in g.items()}
    updates = {0: ClientUpdate(0, state, {"image": 7}, {"loss_image": 1.0, "steps": 1}),
               1: ClientUpdate(1, state, {"image": 2, "audio": 3}, {"loss_image": 1.0, "steps": 1})}
    _, metrics, _ = run_round(g, [0, 1], updates.__getitem__, weighting="modality")
    by = {m["client"]: m for m in metrics}
    assert by[0]["bytes_up"] == 10 * 4 + 4 * 2 + 5 * 4                 # trunk + image stem (fp16) + head
    assert by[1]["bytes_up"] == 10 * 4 + 3 * 8 + 4 * 2 + 5 * 4         # + the audio stem (fp64)
    assert by[0]["bytes_down"] == by[1]["bytes_down"] == 10 * 4 + 3 * 8 + 4 * 2 + 5 * 4
    _, metrics, _ = run_round(g, [0], updates.__getitem__, share=lambda k: is_shared(k, False), weighting="total")
    assert metrics[0]["bytes_up"] == metrics[0]["bytes_down"] == 10 * 4 + 3 * 8 + 4 * 2  # the head stays local
