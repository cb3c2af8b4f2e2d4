"""The GPU check's --smoke mode (scripts/gpu_check.py): the same command a CUDA machine runs, shrunk to CPU, so it
never rots: every section runs or says why not, the rehearsals time two rounds, and both reports are written."""
import json
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_the_gpu_check_smoke_runs_every_section_and_writes_its_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check
    # the budget and each section's timeout x 20: on a loaded machine they bound a hang, not the speed
    out = gpu_check.main(["--smoke", "--out", str(tmp_path), "--standins", str(tmp_path / "standins"),
                          "--timeout-scale", "20"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["sections"].keys() == out["sections"].keys()
    assert saved["sections"]["cuda tests"]["status"] == "skipped"
    for name, s in saved["sections"].items():
        assert s["status"] in ("ok", "skipped"), (name, s)
    rehearsals = {n: s["result"] for n, s in saved["sections"].items() if n.startswith("rehearse ")}
    assert len(rehearsals) == 3
    for r in rehearsals.values():
        assert len(r["rounds_s"]) == 2 and r["tier"] == "device" and r["auto"].startswith("data.residency=auto: device")
        assert set(r["step_s"]) == {"image", "audio"} and r["rss_peak_gib"] >= r["rss_after_build_gib"] > 0
    assert sum(1 for n in saved["sections"] if n.startswith("bench ")) == 2
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| vggsound_resnet18 | device" in md
