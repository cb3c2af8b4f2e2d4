"""CUDA paths: AMP (bf16 and fp16 with the GradScaler), channels_last, on-device generators. Skipped
without a GPU, never faked."""
import pytest
import torch

import pretrain
from conftest import ROOT, TINY_DATA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("amp", ["bf16", "fp16", "fp32"])
def test_pretrain_on_cuda(tmp_path, cache_dir, monkeypatch, amp):
    monkeypatch.chdir(ROOT)
    pretrain.main(["configs/smoke.yaml", f"--run.out_dir={tmp_path}", f"--data.cache_dir={cache_dir}", *TINY_DATA,
                   "--run.device=cuda", f"--run.amp={amp}", "--run.progress=false", "--fed.rounds=2"])
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["round"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_augmentation_on_cuda_matches_generator_determinism(tiny_data):
    from data import augment
    cfg, data = tiny_data
    md = data["image"].to("cuda")
    x = md.train_x[:16]
    a = augment("image", x, md, cfg, torch.Generator(device="cuda").manual_seed(0))
    b = augment("image", x, md, cfg, torch.Generator(device="cuda").manual_seed(0))
    assert a.is_cuda and torch.equal(a, b)


def test_bench_cuda_reports_tflops(tmp_path, cache_dir, monkeypatch):
    import bench
    monkeypatch.chdir(ROOT)
    res = bench.main(["--config", "configs/smoke.yaml", "--steps", "2", "--repeats", "1", "--workers", "0",
                      f"--out={tmp_path / 'b.json'}", f"--data.cache_dir={cache_dir}", "--run.device=cuda",
                      "--skip-scaling", *TINY_DATA])
    assert res["tflops"]["image"]["achieved_tflops"] > 0
