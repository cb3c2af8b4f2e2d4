"""CUDA paths: AMP (bf16 and fp16 with the GradScaler), channels_last, on-device generators. Skipped
without a GPU, never faked."""
import pytest
import torch

import pretrain
from helpers import ROOT, TINY_DATA


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("amp", ["bf16", "fp16", "fp32"])
def test_pretrain_on_cuda(tmp_path, cache_dir, monkeypatch, amp):
    monkeypatch.chdir(ROOT)
    pretrain.main(["configs/smoke.yaml", f"--run.out_dir={tmp_path}", f"--data.cache_dir={cache_dir}", *TINY_DATA,
                   "--run.device=cuda", f"--run.amp={amp}", "--run.progress=false", "--fed.rounds=2"])
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["round"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_augmentation_on_cuda_matches_generator_determinism(tiny_data):
    from modality_specs import augment
    cfg, data = tiny_data
    md = data["image"].to("cuda")
    x = md.train_x[:16]
    a = augment("image", x, md, cfg, torch.Generator(device="cuda").manual_seed(0))
    b = augment("image", x, md, cfg, torch.Generator(device="cuda").manual_seed(0))
    assert a.is_cuda and torch.equal(a, b)


def test_bench_cuda_reports_tflops(tmp_path, cache_dir, monkeypatch):
    from helpers import script
    bench = script("bench")
    monkeypatch.chdir(ROOT)
    res = bench.main(["--config", "configs/smoke.yaml", "--steps", "2", "--repeats", "1", "--workers", "0",
                      f"--out={tmp_path / 'b.json'}", f"--data.cache_dir={cache_dir}", "--run.device=cuda",
                      "--skip-scaling", *TINY_DATA])
    img = res["tflops"]["image"]
    assert img["flops_per_step"] > 0 and 0 < img["achieved_tflops"]
    if img["fraction_of_peak"] is not None:  # a known GPU: the fraction is the achieved rate over its bf16 peak
        assert img["fraction_of_peak"] == pytest.approx(img["achieved_tflops"] / res["tflops"]["bf16_peak_tflops"])
        assert img["fraction_of_peak"] < 1


def test_bf16_training_steps_do_not_sync_the_device():
    """torch's sync debug mode raises on any device->host synchronisation inside the steps (bf16: no scaler)."""
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    import test_step_path as t
    from models import ModelConfig, build_model
    data = {m: md.to("cuda") for m, md in t._data().items()}
    model = build_model(ModelConfig(arch="resnet_tiny", width=8), t.SHAPES).cuda()
    from federation import FedConfig
    from local_update import OptimConfig, local_ssl_update, make_optimizer
    import runtime
    from data import DataConfig
    opt = make_optimizer(model, OptimConfig(batch_size=8))
    idx = {m: torch.arange(len(md.train_x), device="cuda") for m, md in data.items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    steps = {"n": 0}

    def count():  # polled after every step, inside the sync-checked region
        steps["n"] += 1
        return False
    local_ssl_update(model, opt, runtime.make_scaler(torch.device("cuda"), "bf16"), data, idx, DataConfig(), FedConfig(),
                     OptimConfig(batch_size=8), 0.2, 0.05, g, "bf16", max_steps=2)  # warm-up (allocator, kernels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the final loss means (.item()) are the only sync, after the last step
            local_ssl_update(model, opt, runtime.make_scaler(torch.device("cuda"), "bf16"), data, idx, DataConfig(),
                             FedConfig(), OptimConfig(batch_size=8), 0.2, 0.05, g, "bf16", count, max_steps=6)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert steps["n"] == 6  # every step ran before the one sync


def test_fp16_kill_and_resume_is_exact(tmp_path, cache_dir, monkeypatch):
    """The GradScaler's loss scale is in last.pt: an fp16 run resumed mid-way ends where an uninterrupted one does."""
    import shutil
    monkeypatch.chdir(ROOT)
    common = ["configs/smoke.yaml", f"--data.cache_dir={cache_dir}", *TINY_DATA, "--run.device=cuda", "--run.amp=fp16",
              "--run.progress=false", "--fed.rounds=3", "--run.deterministic=true", "--run.final_probe=false"]
    pretrain.main([*common, f"--run.out_dir={tmp_path / 'full'}"])
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "full" / "last.pt.prev", cut / "last.pt")
    shutil.copy(tmp_path / "full" / "log.jsonl", cut / "log.jsonl")
    assert torch.load(cut / "last.pt", weights_only=True)["scaler"]["scale"] > 0
    pretrain.main(["--resume", str(cut), "--run.progress=false"])
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
