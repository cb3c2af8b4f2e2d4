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
    if digests.platform_key() != RECORDED["platform"]:
        pytest.skip(f"digests were recorded on {RECORDED['platform']}, this is {digests.platform_key()}: "
                    f"bits differ across torch builds and instruction sets")
    assert digests.run_case(case, str(cache_dir), tmp_path) == RECORDED["digests"][case]
