"""A refactor proves itself by unchanged bits: every deterministic case of scripts/digests.py (one per server
strategy, loss composition, head placement and backbone family) ends with the final global weights recorded in
tests/digests.json before the code moved. A deliberate change of numerics re-records them with
`python scripts/digests.py --write` and says why in its commit."""
import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import digests  # noqa: E402

RECORDED = json.loads((ROOT / "tests" / "digests.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(digests.CASES))
def test_final_weights_unchanged(case, cache_dir, tmp_path):
    """Exact on the recording platform (torch build and instruction set); elsewhere every tensor's norm within
    digests.NORM_RTOL, since other rounding moves the last bits but a change of numerics moves far more."""
    digest, norms = digests.run_case(case, str(cache_dir), tmp_path, norms=True)
    want = RECORDED["norms"][case]
    assert norms.keys() == want.keys()
    off = {k: (norms[k], want[k]) for k in want if abs(norms[k] - want[k]) > digests.NORM_RTOL * max(want[k], 1e-12)}
    assert not off, f"{len(off)} tensors' norms moved past {digests.NORM_RTOL:g}: {dict(list(off.items())[:3])}"
    if digests.platform_key() == RECORDED["platform"]:
        assert digest == RECORDED["digests"][case]


def test_the_norm_guard_catches_a_small_change_of_numerics():
    import torch
    state = {"w": torch.ones(100), "b": torch.zeros(3), "n": torch.tensor(5)}
    moved = {**state, "w": state["w"] * (1 + 5 * digests.NORM_RTOL)}
    a, b = digests.state_norms(state), digests.state_norms(moved)
    assert set(a) == {"w", "b"} and abs(b["w"] - a["w"]) > digests.NORM_RTOL * a["w"]
