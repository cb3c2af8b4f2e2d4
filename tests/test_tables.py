"""tables.py: aggregation arithmetic, and one tiny end-to-end run of the whole grid."""
import statistics

import pytest

import tables
from conftest import ROOT, TINY_DATA


def _res(seed, accs):
    """A results.json stand-in: image task, linear + knn, three label fractions."""
    rows = [{"task": "image", "features": "image", "protocol": p, "label_frac": f, "acc": accs[p][i]}
            for p in accs for i, f in enumerate((0.01, 0.1, 1.0))]
    return {"seed": seed, "rows": rows, "config_name": "c.yaml"}


def test_mean_std_of_known_per_seed_numbers():
    assert tables.mean_std([70.0, 72.0, 74.0]) == "72.00 ± 2.00"       # sample std (n-1)
    assert tables.mean_std([1.0, 2.0]) == f"1.50 ± {statistics.stdev([1.0, 2.0]):.2f}"
    assert tables.mean_std([80.5]) == "80.50 (n=1)"
    results = {"fssuavl": [_res(0, {"linear": [50, 60, 70], "knn": [40, 50, 60]}),
                           _res(1, {"linear": [52, 62, 74], "knn": [40, 52, 60]}),
                           _res(2, {"linear": [54, 64, 72], "knn": [40, 54, 60]})]}
    rows = tables.accuracy_table(results, "image", "image", ["fssuavl", "image_only"])
    assert len(rows) == 2 and rows[0]["model"] == "FSSUAVL (one model)" and rows[0]["seeds"] == "0 1 2"
    assert rows[0]["1% labels"] == "52.00 ± 2.00" and rows[0]["100% labels"] == "72.00 ± 2.00"
    assert rows[1]["protocol"] == "knn" and rows[1]["1% labels"] == "40.00 ± 0.00"
    md = tables.to_markdown(rows, "T")
    assert "| FSSUAVL (one model) | linear | 0 1 2 | c.yaml | 52.00 ± 2.00 |" in md


def test_tables_end_to_end_tiny(tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "tables"
    args = ["--config", "configs/smoke.yaml", "--seeds", "0", "1", "--out", str(out), f"--data.cache_dir={cache_dir}",
            "--run.progress=false", *TINY_DATA, "--eval.max_train_images=300", "--eval.wd_grid=[1e-3]"]
    res = tables.main(args)
    t = {name: rows for name, (title, rows) in res["tables"].items()}
    assert [r["model"] for r in t["table1_image"][0:6:2]] == ["FSSUAVL (one model)", "image-only model", "random init"]
    assert [r["model"] for r in t["table2_audio"][0:6:2]] == ["FSSUAVL (one model)", "audio-only model", "random init"]
    assert {r["features"] for r in t["table3_paired"]} == set(tables.PAIRED_FEATURES.values())
    assert all("±" in r["100% labels"] for r in t["table1_image"])
    eff = {r["setup"]: r for r in t["table4_efficiency"]}
    ratio = eff["ratio FSSUAVL / two models"]
    # smoke.yaml: both clients hold both modalities, so the two-model setup uploads two models per client
    assert 0.4 < ratio["parameters"] < 0.7 and 0.4 < ratio["MB up (run)"] < 0.7
    assert eff["FSSUAVL (one model)"]["GFLOPs/image"] == pytest.approx(eff["two models: image-only + audio-only"]["GFLOPs/image"])
    assert any("Welch p =" in ln for ln in res["findings"])
    for f in ("tables.md", "table1_image.csv", "table2_audio.csv", "table3_paired.csv", "table4_efficiency.csv"):
        assert (out / f).stat().st_size > 0
    mtime = (out / "runs" / "fssuavl_seed0" / "results.json").stat().st_mtime_ns
    tables.main(args)  # a second call reuses every finished run and evaluation
    assert (out / "runs" / "fssuavl_seed0" / "results.json").stat().st_mtime_ns == mtime
    one = args[:3] + ["0"] + args[5:]  # --seeds 0 only, the same out dir
    res = tables.main(one + ["--ablations", "--strategies"])
    t5 = res["tables"]["table5_ablations"][1]
    assert [r["variant"] for r in t5][1:] == [label for _, label, _ in tables.ABLATIONS]
    assert [r["variant"] for r in res["tables"]["table6_strategies"][1]][1:] == [lb for _, lb, _ in tables.STRATEGY_RUNS]
    ck = tables.runtime.load_checkpoint(out / "runs" / "ablation_paper_plain_seed0" / "last.pt")
    assert ck["config"]["fed"]["weighting"] == "total" and ck["config"]["model"]["bn_stats"] == "shared"
    assert tables.runtime.load_checkpoint(out / "runs" / "strategy_ldawa_seed0" / "last.pt")["config"]["fed"]["aggregation"] == "ldawa"
    assert any(ln.startswith("Strategy, audio linear probe: ") and "no test" in ln for ln in res["findings"])


def test_t_test_p_values_against_closed_forms():
    import math
    # Student's t with 1 and 2 degrees of freedom has closed-form tails
    for t in (0.5, 1.0, 3.0, 12.706):
        assert tables.betainc(0.5, 0.5, 1 / (1 + t * t)) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-10)
        assert tables.betainc(1.0, 0.5, 2 / (2 + t * t)) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)
    # Welch on two seeds per side with equal variances: df = 2, t = -10 / sqrt(2)
    t, df, p = tables.welch([0.0, 2.0], [10.0, 12.0])
    assert df == pytest.approx(2.0) and t == pytest.approx(-10 / math.sqrt(2))
    assert p == pytest.approx(1 - 10 / math.sqrt(2) / math.sqrt(2 + 50), rel=1e-9)
    # the tabulated 5% point of t with 4 df
    assert tables.betainc(2.0, 0.5, 4 / (4 + 2.776445 ** 2)) == pytest.approx(0.05, abs=1e-5)


def test_findings_call_a_win_only_below_p_005():
    win = tables.finding("Image", "A", [80.0, 81.0, 82.0], "B", [70.0, 71.0, 72.0])
    assert "**A beats B**" in win and "Welch p = " in win
    loss = tables.finding("Image", "A", [70.0, 71.0, 72.0], "B", [80.0, 81.0, 82.0])
    assert "**A is below B**" in loss
    tie = tables.finding("Image", "A", [80.0, 82.0, 78.0], "B", [80.5, 79.0, 81.5])
    assert "no significant difference between A and B" in tie and "p = " in tie
    assert "no test" in tables.finding("x", "A", [1.0], "B", [2.0, 3.0])


def test_a_block_of_uncorrected_tests_says_how_many_would_pass_by_chance():
    seeds = lambda v: [{"rows": [{"task": "image", "features": "image", "protocol": "linear", "label_frac": 1.0,  # noqa: E731
                                  "acc": a}]} for a in v]
    default = seeds([80.0, 80.5, 81.0])
    ablations = {"paper_plain": seeds([70.0, 70.5, 71.0]), "bn_shared": seeds([80.2, 80.4, 80.9])}
    lines = tables.findings({"fssuavl": default}, ablations, {})
    caution = [ln for ln in lines if ln.startswith("Ablations: ")]
    assert len(caution) == 1
    assert "2 comparisons" in caution[0] and "about 0.1 would pass by chance" in caution[0] and "1 passed" in caution[0]


def test_paper_plain_config_is_the_default_with_our_additions_off():
    import yaml
    default = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    plain = yaml.safe_load((ROOT / "configs/paper_plain.yaml").read_text())
    diff = tables.runtime.dict_diff(default, plain)
    assert sorted(d.split(":")[0] for d in diff) == ["fed.weighting", "model.bn_momentum", "model.bn_stats", "run.out_dir"]
    assert sorted(o.split("=")[0].lstrip("-") for o in tables.PAPER_PLAIN) == ["fed.weighting", "model.bn_momentum",
                                                                               "model.bn_stats"]
    assert plain["fed"]["weighting"] == "total" and plain["model"]["bn_stats"] == "shared"
