"""The training step as a GPU would run it, checked on CPU: no host sync inside a step, torch.compile that
compiles once per modality and stays compiled, and the AMP state that exact resume needs."""
import pytest
import torch

import checkpoints
import runtime
from data import DataConfig
from helpers import SHAPES, tiny_modalities
from local_update import LocalSettings, OptimConfig, local_ssl_update, make_optimizer
from losses import LossConfig
from models import BatchNorm, ModelConfig, build_model


def _update(model, data, steps, seed=0, amp="fp32"):
    opt = make_optimizer(model, OptimConfig(batch_size=8))
    scaler = runtime.make_scaler(torch.device("cpu"), amp)
    idx = {m: torch.arange(len(md.train_x)) for m, md in data.items()}
    g = torch.Generator().manual_seed(seed)
    return local_ssl_update(model, opt, scaler, data, idx, LocalSettings(DataConfig(), OptimConfig(batch_size=8),
                                                                        LossConfig(), amp=amp), 0.05, g, max_steps=steps)


class SyncCounter:
    """Counts the Python-level ways a tensor's value reaches the host (each a device sync on CUDA)."""
    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, **kw):
                self.n += 1
                return _real(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, wrapped)


def test_training_steps_never_read_a_device_value(monkeypatch):
    counts = {}
    for steps in (2, 6):  # both modalities train in either
        model = build_model(ModelConfig(arch="resnet_tiny", width=8), SHAPES)
        with monkeypatch.context() as mp:
            counter = SyncCounter(mp)
            _update(model, tiny_modalities(), steps)
        counts[steps] = counter.n
    # the only reads are the per-modality loss means after the last step: none per step
    assert counts[2] == counts[6] == 2
    # the counter does catch a per-step read: stock BatchNorm with momentum=None calls float(num_batches_tracked)
    stock = torch.nn.BatchNorm2d(4, momentum=None).train()
    with monkeypatch.context() as mp:
        counter = SyncCounter(mp)
        for _ in range(3):
            stock(torch.randn(2, 4, 3, 3))
    assert counter.n == 3


def test_our_batchnorm_equals_stock_batchnorm():
    for momentum in (None, 0.1):
        ours, ref = BatchNorm(6, momentum).train(), torch.nn.BatchNorm2d(6, momentum=momentum).train()
        for s in range(4):
            x = torch.randn(5, 6, 3, 3) * (s + 1) + s
            assert torch.allclose(ours(x), ref(x), atol=1e-5)
        assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
        assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
        assert ours.num_batches_tracked.item() == 4
        assert list(ours.state_dict()) == list(ref.state_dict())  # checkpoints keep the stock key names


@pytest.mark.slow
def test_compile_compiles_once_per_modality_then_stays_compiled():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    data = tiny_modalities()
    eager = build_model(ModelConfig(arch="resnet_tiny", width=8), SHAPES)
    compiled = build_model(ModelConfig(arch="resnet_tiny", width=8), SHAPES)
    compiled.load_state_dict(eager.state_dict())
    compiled.trunk.compile(backend="aot_eager")  # what run.compile does, without the C++ build of inductor
    counters.clear()
    _update(compiled, data, steps=2)  # warm-up: one image step and one audio step
    warm = sum(counters["stats"].values()), dict(counters["recompiles"])
    after = _update(compiled, data, steps=12, seed=1)
    assert (sum(counters["stats"].values()), dict(counters["recompiles"])) == warm  # nothing new compiled
    _update(eager, data, steps=2)
    ref = _update(eager, data, steps=12, seed=1)
    assert after["loss_image"] == pytest.approx(ref["loss_image"], rel=1e-4)
    for (k, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4), k


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    state = scaler.state_dict()
    checkpoints.save_checkpoint({"format": checkpoints.CKPT_FORMAT, "scaler": state}, tmp_path / "c.pt")
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(checkpoints.load_checkpoint(tmp_path / "c.pt")["scaler"])
    assert back.state_dict() == state and back.get_scale() == 1024.0
