"""scripts/compare_runs.py: the arm over seeds against its raw input (and a second arm), Welch's p computed."""
import json

from helpers import script
from significance import welch

compare_runs = script("compare_runs")


def _results(path, acc, raw, dim=2048):
    rows = [{"task": "audio", "features": "audio", "protocol": "linear", "label_frac": 0.1, "acc": acc, "dim": dim},
            {"task": "paired", "features": "fused", "protocol": "linear", "label_frac": 0.1, "acc": 1.0, "dim": 9}]
    raw_rows = [{"task": "audio", "features": "audio", "protocol": "linear", "label_frac": 0.1, "acc": raw, "dim": 1632}]
    path.write_text(json.dumps({"rows": rows, "raw_input_rows": raw_rows}))
    return str(path)


def test_each_row_is_the_mean_over_seeds_with_welchs_p_against_the_raw_input_and_the_other_arm(tmp_path, capsys):
    a = [_results(tmp_path / f"a{i}.json", acc, raw) for i, (acc, raw) in enumerate([(87.0, 82.0), (86.0, 81.5), (88.5, 82.3)])]
    b = [_results(tmp_path / f"b{i}.json", acc, 0.0, dim=256) for i, acc in enumerate([77.5, 80.1, 79.0])]
    compare_runs.main([*a, "--vs", *b, "--name-a", "time", "--name-b", "avg"])
    out = capsys.readouterr().out.splitlines()
    row = [ln for ln in out if ln.startswith("| audio")]
    assert len(row) == 1  # the fused row is not a single-modality task
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[:5] == ["audio", "linear", "10%", "87.17 ± 1.26 (2048)", "81.93 ± 0.40 (1632)"]
    assert cells[5] == f"{welch([87.0, 86.0, 88.5], [82.0, 81.5, 82.3])[2]:.3f}"
    assert cells[6] == "78.87 ± 1.31 (256)" and cells[7] == f"{welch([87.0, 86.0, 88.5], [77.5, 80.1, 79.0])[2]:.3f}"
