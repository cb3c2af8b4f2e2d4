"""runtime.py: derived random streams."""
import torch

import runtime


def test_derived_seeds_are_stable_and_distinct():
    """The same keys give the same seed in another process whatever its string hashing (PYTHONHASHSEED), so a resumed
    run or another engine's process draws the same streams; other keys give another."""
    import os
    import subprocess
    import sys
    from helpers import ROOT
    here = runtime.derive_seed(0, "client", 3, 7)
    for hs in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", "import runtime; print(runtime.derive_seed(0, 'client', 3, 7))"],
                             cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": hs}, capture_output=True, text=True)
        assert int(out.stdout) == here, out.stderr
    assert here != runtime.derive_seed(0, "client", 7, 3) and here != runtime.derive_seed(1, "client", 3, 7)
    a = torch.rand(4, generator=runtime.make_generator("cpu", 1, "x"))
    assert torch.equal(a, torch.rand(4, generator=runtime.make_generator("cpu", 1, "x")))
