"""scripts/bench.py runs end to end and reports every section; timings are not asserted (no timed unit tests)."""
import json

import pytest
import torch

from helpers import ROOT, TINY_DATA, script

bench = script("bench")


@pytest.mark.slow
def test_bench_reports_all_sections(tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "bench.json"
    res = bench.main(["--config", "configs/smoke.yaml", "--steps", "1", "--repeats", "1", "--warmup", "0",
                      "--workers", "0", "--skip-compile", f"--out={out}", f"--data.cache_dir={cache_dir}", *TINY_DATA])
    saved = json.loads(out.read_text())
    assert saved["batch_size"] == res["batch_size"] == 64
    pipelines = {(r["pipeline"], r["modality"]) for r in saved["throughput"]}
    assert len(pipelines) == 2 * (4 if saved["bf16_native"] else 2)
    for r in saved["throughput"]:  # best throughput and fastest step are one timing seen two ways: batch = their product
        batch = 64 if r["modality"] == "image" else res["batch_size"]
        assert r["samples_per_s_best"] * r["seconds_per_step_min"] == pytest.approx(batch, rel=1e-9)
        assert r["samples_per_s_best"] >= r["samples_per_s_median"]
    std = {r["modality"]: r["samples_per_s_median"] for r in saved["throughput"] if r["pipeline"].startswith("standard: ")}
    for r in (r for r in saved["throughput"] if r["pipeline"].startswith("ours")):
        assert r["ratio_vs_standard"] == pytest.approx(r["samples_per_s_median"] / std[r["modality"]])
    assert 0 < saved["aggregation"]["fraction_of_local_epoch"] and saved["peak_memory_mb"] > 0
    assert [r["k"] for r in saved["round_vs_k"]] == [1, 2, 4, 8] and all(r["seconds"] > 0 for r in saved["round_vs_k"])
    assert [s["input"] for s in saved["throughput_vs_input_size"]] == [[28, 28], [56, 56]]


def test_standard_audio_views_are_normalised_log_mels(tiny_data):
    cfg, data = tiny_data
    from engine import PretrainConfig
    pc = PretrainConfig(data=cfg)
    import numpy as np
    ds = bench.StandardAudio(np.random.default_rng(0).integers(-3000, 3000, (4, 16000)).astype(np.int16), pc, 0.0, 1.0)
    v1, v2 = ds[0]
    assert v1.shape == v2.shape == data["audio"].shape and not torch.equal(v1, v2)
