"""paper_tables.py: aggregation arithmetic, and one tiny end-to-end run of the whole grid."""
import statistics

import pytest

import paper_tables
from checkpoints import load_checkpoint
from helpers import ROOT, TINY_DATA


def _res(seed, accs):
    """A results.json stand-in: image task, linear + knn, three label fractions."""
    rows = [{"task": "image", "features": "image", "protocol": p, "label_frac": f, "acc": accs[p][i]}
            for p in accs for i, f in enumerate((0.01, 0.1, 1.0))]
    return {"seed": seed, "rows": rows, "config_name": "c.yaml"}


def test_mean_std_of_known_per_seed_numbers():
    assert paper_tables.mean_std([70.0, 72.0, 74.0]) == "72.00 ± 2.00"       # sample std (n-1)
    assert paper_tables.mean_std([1.0, 2.0]) == f"1.50 ± {statistics.stdev([1.0, 2.0]):.2f}"
    assert paper_tables.mean_std([80.5]) == "80.50 (n=1)"
    results = {"fssuavl": [_res(0, {"linear": [50, 60, 70], "knn": [40, 50, 60]}),
                           _res(1, {"linear": [52, 62, 74], "knn": [40, 52, 60]}),
                           _res(2, {"linear": [54, 64, 72], "knn": [40, 54, 60]})]}
    rows = paper_tables.accuracy_table(results, "image", "image", ["fssuavl", "image_only"])
    assert len(rows) == 2 and rows[0]["model"] == "FSSUAVL (one model)" and rows[0]["seeds"] == "0 1 2"
    assert rows[0]["1% labels"] == "52.00 ± 2.00" and rows[0]["100% labels"] == "72.00 ± 2.00"
    assert rows[1]["protocol"] == "knn" and rows[1]["1% labels"] == "40.00 ± 0.00"
    md = paper_tables.to_markdown(rows, "T")
    assert "| FSSUAVL (one model) | linear | 0 1 2 | c.yaml | 52.00 ± 2.00 |" in md


@pytest.mark.slow
def test_tables_end_to_end_tiny(tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "tables"
    args = ["--config", "configs/smoke.yaml", "--seeds", "0", "1", "--out", str(out), f"--data.cache_dir={cache_dir}",
            "--run.progress=false", *TINY_DATA, "--eval.max_train_images=300", "--eval.wd_grid=[1e-3]"]
    res = paper_tables.main(args)
    t = {name: rows for name, (title, rows) in res["tables"].items()}
    assert [r["model"] for r in t["table1_image"][0:6:2]] == ["FSSUAVL (one model)", "image-only model", "random init"]
    assert [r["model"] for r in t["table2_audio"][0:6:2]] == ["FSSUAVL (one model)", "audio-only model", "random init"]
    assert {r["features"] for r in t["table3_paired"]} == set(paper_tables.PAIRED_FEATURES.values())
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
    paper_tables.main(args)  # a second call reuses every finished run and evaluation
    assert (out / "runs" / "fssuavl_seed0" / "results.json").stat().st_mtime_ns == mtime
    one = args[:3] + ["0"] + args[5:]  # --seeds 0 only, the same out dir
    res = paper_tables.main(one + ["--ablations", "--strategies"])
    t5 = res["tables"]["table5_ablations"][1]
    assert [r["variant"] for r in t5][1:] == [label for _, label, _ in paper_tables.ABLATIONS]
    assert [r["variant"] for r in res["tables"]["table6_strategies"][1]][1:] == [lb for _, lb, _ in paper_tables.STRATEGY_RUNS]
    ck = load_checkpoint(out / "runs" / "ablation_paper_plain_seed0" / "last.pt")
    assert ck["config"]["fed"]["weighting"] == "total" and ck["config"]["model"]["bn_stats"] == "shared"
    assert load_checkpoint(out / "runs" / "strategy_ldawa_seed0" / "last.pt")["config"]["fed"]["aggregation"] == "ldawa"
    assert any(ln.startswith("Strategy, audio linear probe: ") and "no test" in ln for ln in res["findings"])


def test_a_block_of_uncorrected_tests_says_how_many_would_pass_by_chance():
    seeds = lambda v: [{"rows": [{"task": "image", "features": "image", "protocol": "linear", "label_frac": 1.0,  # noqa: E731
                                  "acc": a}]} for a in v]
    default = seeds([80.0, 80.5, 81.0])
    ablations = {"paper_plain": seeds([70.0, 70.5, 71.0]), "bn_shared": seeds([80.2, 80.4, 80.9])}
    lines = paper_tables.findings({"fssuavl": default}, ablations, {})
    caution = [ln for ln in lines if ln.startswith("Ablations: ")]
    assert len(caution) == 1
    assert "2 comparisons" in caution[0] and "about 0.1 would pass by chance" in caution[0] and "1 passed" in caution[0]


def test_the_paper_plain_variant_is_read_from_its_config_file():
    """Table 5's paper-plain row runs exactly the lines configs/paper_plain.yaml adds to its base."""
    assert sorted(paper_tables.PAPER_PLAIN) == ["--fed.weighting=total", "--model.bn_momentum=0.1",
                                                "--model.bn_stats=shared"]
