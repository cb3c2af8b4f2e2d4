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

RECORDS = digests.read_records()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(digests.CASES))
def test_final_weights_unchanged(case, cache_dir, tmp_path):
    """Exact where this platform class (torch build and instruction set) has a record (tests/digests.json holds an
    AVX-512-only and an AMX one); elsewhere every parameter's norm within digests.NORM_RTOL of max(norm, NORM_FLOOR)
    of the first record's (coarse: other rounding moves them that far). Never skipped."""
    digest, norms = digests.run_case(case, str(cache_dir), tmp_path, norms=True)
    own = digests.own_record(RECORDS)
    if own is not None:
        assert digest == own["digests"][case], f"{case}: other bits than recorded on this platform {own['platform']}"
        return
    off = digests.norms_off(norms, RECORDS[0]["norms"][case])
    assert not off, f"{len(off)} tensors' norms moved past the tolerance: {dict(list(off.items())[:3])}"


def test_every_record_holds_every_case_and_its_norms():
    assert RECORDS and len({json.dumps(r["platform"], sort_keys=True) for r in RECORDS}) == len(RECORDS)
    for r in RECORDS:
        assert set(r["digests"]) >= set(digests.CASES) and set(r["norms"]) >= set(digests.CASES), r["platform"]


def test_the_records_of_two_platforms_agree_within_the_tolerance():
    """Each record's norms pass the fallback check against every other record's: the tolerance is as wide as another
    platform's rounding really moved them, measured, not guessed."""
    for a in RECORDS:
        for b in RECORDS:
            for case in digests.CASES:
                assert not digests.norms_off(a["norms"][case], b["norms"][case]), (case, a["platform"], b["platform"])


def test_the_norm_guard_catches_a_small_change_of_numerics():
    import torch
    state = {"w": torch.ones(100), "b": torch.zeros(3), "n": torch.tensor(5)}
    moved = {**state, "w": state["w"] * (1 + 5 * digests.NORM_RTOL)}
    a, b = digests.state_norms(state), digests.state_norms(moved)
    assert set(a) == {"w", "b"} and list(digests.norms_off(b, a)) == ["w"] and not digests.norms_off(a, a)
    small = {"bias": 0.01, "bn.running_var": 2.0}
    # rounding-sized on a small tensor; running statistics are not compared by the fallback
    assert not digests.norms_off({"bias": 0.01 + 0.5 * digests.NORM_RTOL, "bn.running_var": 2.2}, small)
    assert list(digests.norms_off({"bias": 0.01 + 2 * digests.NORM_RTOL, "bn.running_var": 2.0}, small)) == ["bias"]
