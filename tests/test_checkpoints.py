"""checkpoints.py: atomic round trips that keep the previous file, RNG states that survive weights_only loading, and
refusals of pickles and garbage that never suggest an unsafe load."""
import pytest
import torch

import checkpoints
import runtime
from checkpoints import CheckpointError


def test_checkpoint_round_trip_and_previous_kept(tmp_path):
    path = tmp_path / "run" / "last.pt"
    obj = {"format": checkpoints.CKPT_FORMAT, "round": 3, "model": {"w": torch.randn(3)}, "config": {"a": [1, 2]},
           "rng": runtime.rng_state()}
    checkpoints.save_checkpoint(obj, path)
    checkpoints.save_checkpoint({**obj, "round": 4}, path)
    back = checkpoints.load_checkpoint(path)
    assert back["round"] == 4 and torch.equal(back["model"]["w"], obj["model"]["w"]) and back["config"] == {"a": [1, 2]}
    assert checkpoints.load_checkpoint(path.with_name("last.pt.prev"))["round"] == 3
    assert not list(path.parent.glob("*.tmp"))
    # RNG states survive weights_only loading: restored, every generator draws what it drew after the save
    import random

    import numpy as np
    after = (torch.rand(3), np.random.rand(3), random.random())
    runtime.set_rng_state(back["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], again[0]) and (after[1] == again[1]).all() and after[2] == again[2]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_refuses_arbitrary_pickles_and_garbage(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": checkpoints.CKPT_FORMAT, "x": Evil()}, p)
    with pytest.raises(CheckpointError, match=r"refusing .*evil.pt: .*\(print\); loading it could run arbitrary code") as e:
        checkpoints.load_checkpoint(p)
    assert "weights_only" not in str(e.value) and "safe_globals" not in str(e.value)  # no unsafe advice passed on
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        checkpoints.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an FSSUAVL checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "other.pt")


def test_a_full_disk_reported_by_torch_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint({"format": checkpoints.CKPT_FORMAT, "round": 1}, path)

    def full(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*last.pt: .*file write failed; the previous"):
        checkpoints.save_checkpoint({"format": checkpoints.CKPT_FORMAT, "round": 2}, path)
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)["round"] == 1 and not list(tmp_path.glob("*.tmp"))
