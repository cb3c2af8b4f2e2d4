"""Server strategies: each against a hand-computed example on tiny state dicts (prepare / execute / assert),
the reductions to FedAvg bit for bit, and exact resume of a strategy with server state."""
import json
import math
import shutil

import pytest
import torch

import pretrain
import runtime
from data import DataConfig
from federation import ClientUpdate, FedConfig, run_round
from helpers import SHAPES, smoke_args, tiny_modalities
from local_update import LocalSettings, OptimConfig, local_ssl_update, make_optimizer
from losses import LossConfig
from models import ModelConfig, build_model
from settings import ConfigError
from strategies import STRATEGIES, ProximalTerm, make_strategy


def _round(strategy, global_state, client_states, samples=None, weighting="total"):
    samples = samples or [{"image": 1}] * len(client_states)
    ups = {i: ClientUpdate(i, s, samples[i], {"loss_image": 1.0, "steps": 1}) for i, s in enumerate(client_states)}
    return run_round(global_state, list(ups), ups.__getitem__, weighting=weighting, strategy=strategy)[0]


def test_every_registered_strategy_runs_a_round():
    g = {"w": torch.tensor([1.0, 2.0]), "bn.running_mean": torch.tensor([0.5]), "bn.num_batches_tracked": torch.tensor(3)}
    clients = [{k: v + i if v.is_floating_point() else v for k, v in g.items()} for i in range(3)]
    for name in STRATEGIES:
        fed = FedConfig(aggregation=name)  # each strategy at its own defaults
        out = _round(make_strategy(fed, {"w"}), g, clients)
        assert out.keys() == g.keys() and out["bn.num_batches_tracked"].item() == 3, name


def test_fedavgm_by_hand_over_two_rounds():
    fed = FedConfig(aggregation="fedavgm", strategy={"server_momentum": 0.9, "server_lr": 1.0})
    s = make_strategy(fed, param_keys={"w"})
    g = {"w": torch.tensor([1.0]), "bn.running_mean": torch.tensor([1.0])}
    # round 1: average 0.5, pseudo-gradient d = 0.5, v = 0.5, w = 1 - 0.5 = 0.5; the buffer takes the plain average
    g = _round(s, g, [{"w": torch.tensor([0.4]), "bn.running_mean": torch.tensor([0.0])},
                      {"w": torch.tensor([0.6]), "bn.running_mean": torch.tensor([2.0])}])
    assert g["w"].item() == pytest.approx(0.5) and g["bn.running_mean"].item() == pytest.approx(1.0)
    # round 2: average 0.3, d = 0.2, v = 0.9 * 0.5 + 0.2 = 0.65, w = 0.5 - 0.65 = -0.15
    g = _round(s, g, [{"w": torch.tensor([0.3]), "bn.running_mean": torch.tensor([1.0])}])
    assert g["w"].item() == pytest.approx(-0.15, abs=1e-6)
    assert s.state_dict()["v"]["w"].item() == pytest.approx(0.65)


def test_fedavgm_without_momentum_and_fedprox_server_equal_fedavg_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    g = {"a": torch.randn(50, generator=gen), "b": torch.randn(3, 3, generator=gen)}
    clients = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in g.items()} for _ in range(4)]
    samples = [{"image": n} for n in (3, 7, 1, 5)]
    ref = _round(make_strategy(FedConfig()), g, clients, samples)
    for fed in (FedConfig(aggregation="fedavgm", strategy={"server_momentum": 0.0, "server_lr": 1.0}), FedConfig(aggregation="fedprox", strategy={"prox_mu": 0.01})):
        out = _round(make_strategy(fed, {"a", "b"}), g, clients, samples)
        assert all(torch.equal(out[k], ref[k]) for k in g)


def test_ldawa_by_hand():
    s = make_strategy(FedConfig(aggregation="ldawa"))
    g = {"w": torch.tensor([1.0, 0.0]), "z": torch.tensor([0.0, 0.0]), "n": torch.tensor(7)}
    a = {"w": torch.tensor([1.0, 1.0]), "z": torch.tensor([2.0, 2.0]), "n": torch.tensor(9)}   # cos(w) = 1/sqrt(2)
    b = {"w": torch.tensor([2.0, 0.0]), "z": torch.tensor([4.0, 0.0]), "n": torch.tensor(9)}   # cos(w) = 1
    out = _round(s, g, [a, b], samples=[{"image": 1}, {"image": 100}])  # sample counts play no part
    r = 1 / math.sqrt(2)
    assert torch.allclose(out["w"], torch.tensor([(r + 2) / 2, r / 2]))
    assert torch.allclose(out["z"], torch.tensor([3.0, 1.0]))  # a zero global layer: weight 1, the plain mean
    assert out["n"].item() == 9  # integer buffers are copied, not scaled
    # under modality weighting a client is left out of a key it did not train
    g2 = {"trunk.w": torch.tensor([1.0, 0.0]), "stems.audio.w": torch.tensor([1.0, 0.0])}
    c1 = {"trunk.w": torch.tensor([1.0, 1.0]), "stems.audio.w": torch.tensor([5.0, 5.0])}  # image-only: audio stem untouched
    c2 = {"trunk.w": torch.tensor([2.0, 0.0]), "stems.audio.w": torch.tensor([3.0, 0.0])}
    out = _round(make_strategy(FedConfig(aggregation="ldawa")), g2, [c1, c2], [{"image": 4}, {"audio": 4}], "modality")
    assert torch.allclose(out["stems.audio.w"], torch.tensor([3.0, 0.0]))


def test_median_and_trimmed_mean_through_the_interface():
    """Inputs where the median, the trimmed mean and the mean all differ, per coordinate, so a trimmed mean that
    returned the median (or the mean, or trimmed the wrong count) fails."""
    g = {"w": torch.tensor([0.0, 0.0])}
    cols = [(1.0, -7.0), (2.0, 0.0), (100.0, 1.0), (4.0, 5.0), (10.0, 30.0)]  # sorted: 1 2 4 10 100 | -7 0 1 5 30
    clients = [{"w": torch.tensor(c)} for c in cols]
    med = _round(make_strategy(FedConfig(aggregation="median")), g, clients)["w"]
    tm = _round(make_strategy(FedConfig(aggregation="trimmed_mean", strategy={"trim_frac": 0.2})), g, clients)["w"]  # cuts 1 per end
    assert med.tolist() == [4.0, 1.0]
    assert tm.tolist() == pytest.approx([(2 + 4 + 10) / 3, (0 + 1 + 5) / 3])
    mean = torch.tensor(cols).mean(0)
    assert (tm - med).abs().min() > 0.5 and (tm - mean).abs().min() > 0.5
    tm40 = _round(make_strategy(FedConfig(aggregation="trimmed_mean", strategy={"trim_frac": 0.4})), g, clients)["w"]  # cuts 2
    assert tm40.tolist() == [4.0, 1.0]  # with two cut per end of five, only the middle one is left


pytestmark = pytest.mark.usefixtures("in_root")


def _args(out, cache_dir, *extra):
    return smoke_args(out, cache_dir, "--run.deterministic=true", "--run.final_probe=false", "--run.eval_every=0", *extra)


def test_fedprox_is_switched_by_its_strategy_and_a_term_that_does_nothing_is_refused():
    """fed.aggregation=fedprox turns the proximal term on; FedProx with mu = 0 (plain FedAvg) and mu under another
    strategy (FedProx logged as that strategy) are errors that name the fix."""
    assert STRATEGIES["fedprox"].client_hook(FedConfig(aggregation="fedprox", strategy={"prox_mu": 0.5})).mu == 0.5
    assert STRATEGIES["fedprox"].client_hook(FedConfig(aggregation="fedprox")).mu == 0.01  # its Params' default
    assert all(STRATEGIES[n].client_hook(FedConfig(aggregation=n)) is None for n in STRATEGIES if n != "fedprox")
    with pytest.raises(ConfigError, match=r"^fed.strategy.prox_mu=0.0: must be > 0"):
        FedConfig(aggregation="fedprox", strategy={"prox_mu": 0})
    with pytest.raises(ConfigError, match=r"^fed.strategy.prox_mu is not a hyperparameter of fed.aggregation=fedavgm "
                                          r"\(it takes server_momentum, server_lr\); it belongs to fed.aggregation=fedprox"):
        FedConfig(aggregation="fedavgm", strategy={"prox_mu": 0.01})


def test_a_strategy_writes_out_its_hyperparameters_and_reads_their_older_spelling():
    """fed.strategy is written out in full (defaults included) once checked; a config or checkpoint of the older
    spelling (fed.prox_mu, ... beside fed.aggregation: every old config wrote all four) reads the same."""
    from settings import build_dataclass, to_dict
    assert FedConfig(aggregation="fedavgm", strategy={"server_lr": 0.5}).strategy == {"server_momentum": 0.9,
                                                                                       "server_lr": 0.5}
    assert FedConfig().strategy == {}
    old = {"aggregation": "fedprox", "prox_mu": 0.05, "server_momentum": 0.9, "server_lr": 1.0, "trim_frac": 0.1}
    assert to_dict(build_dataclass(FedConfig, old, "fed.")) == to_dict(FedConfig(aggregation="fedprox",
                                                                                  strategy={"prox_mu": 0.05}))
    old_default = {"aggregation": "fedavg", "prox_mu": 0.0, "server_momentum": 0.9, "server_lr": 1.0, "trim_frac": 0.1}
    assert build_dataclass(FedConfig, old_default, "fed.") == FedConfig()
    with pytest.raises(ConfigError, match=r"fed.server_momentum=0.5 acts only under fed.aggregation=fedavgm \(now "
                                          r"fed.strategy.server_momentum\), but fed.aggregation=fedavg"):
        build_dataclass(FedConfig, {**old_default, "server_momentum": 0.5}, "fed.")


def test_fedprox_term_keeps_a_client_near_the_global_weights():
    """One client, the same start, data and random stream: the proximal term shortens the distance travelled."""
    data = tiny_modalities()
    moved = {}
    for hook in (None, ProximalTerm(20.0)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch="resnet_tiny", width=8), SHAPES)
        start = [p.detach().clone() for p in model.parameters()]
        optim = OptimConfig(batch_size=8, lr=0.2, momentum=0.0)
        local_ssl_update(model, make_optimizer(model, optim), runtime.make_scaler(torch.device("cpu"), "fp32"), data,
                         {m: torch.arange(len(md.train_x)) for m, md in data.items()},
                         LocalSettings(DataConfig(), optim, LossConfig(), hook=hook), optim.peak_lr,
                         torch.Generator().manual_seed(0), max_steps=8)
        moved[hook is None] = math.sqrt(sum((p.detach() - p0).pow(2).sum().item() for p, p0 in zip(model.parameters(), start)))
    assert moved[False] < 0.9 * moved[True]


@pytest.mark.slow
def test_fedavgm_kill_and_resume_is_bit_identical(tmp_path, cache_dir):
    common = ["--fed.rounds=3", "--fed.aggregation=fedavgm", "--fed.strategy.server_momentum=0.9"]
    pretrain.main(_args(tmp_path / "full", cache_dir, *common))
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "full" / "last.pt.prev", cut / "last.pt")  # stopped after round 2
    shutil.copy(tmp_path / "full" / "log.jsonl", cut / "log.jsonl")
    ck = torch.load(cut / "last.pt", weights_only=True)
    assert ck["round"] == 2 and ck["server_state"]["v"]  # the server momentum travels with the checkpoint
    pretrain.main(["--resume", str(cut), "--run.progress=false"])
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["server_state"]["v"][k], b["server_state"]["v"][k]) for k in a["server_state"]["v"])
    assert [json.loads(ln)["round"] for ln in (cut / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
