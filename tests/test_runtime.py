"""runtime.py: derived random streams."""
import torch

import runtime


def test_derived_seeds_are_stable_and_distinct():
    assert runtime.derive_seed(0, "client", 3, 7) == runtime.derive_seed(0, "client", 3, 7)
    assert runtime.derive_seed(0, "client", 3, 7) != runtime.derive_seed(0, "client", 7, 3)
    a = torch.rand(4, generator=runtime.make_generator("cpu", 1, "x"))
    assert torch.equal(a, torch.rand(4, generator=runtime.make_generator("cpu", 1, "x")))
