from dataclasses import dataclass, field

import pytest
import torch

import checkpoints
import runtime
import settings
from checkpoints import CheckpointError
from settings import ConfigError


@dataclass
class Inner:
    n: int = 1
    x: float = 0.5
    flag: bool = False
    pair: tuple[float, float] = (0.0, 1.0)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "a"


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.m'"):
        settings.build_dataclass(Outer, {"inner": {"m": 1}})
    with pytest.raises(ConfigError, match=r"inner\.n='3': expected an integer"):
        settings.build_dataclass(Outer, {"inner": {"n": "3"}})
    with pytest.raises(ConfigError, match=r"inner\.flag=1: expected true or false"):
        settings.build_dataclass(Outer, {"inner": {"flag": 1}})
    with pytest.raises(ConfigError, match=r"inner\.pair\[1\]"):
        settings.build_dataclass(Outer, {"inner": {"pair": [0.1, "x"]}})
    with pytest.raises(ConfigError, match="config file not found"):
        settings.load_config(Outer, tmp_path / "nope.yaml")


def test_overrides_are_typed_literals(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  n: 2\nname: b\n")
    cfg = settings.load_config(Outer, p, ["--inner.flag=False", "--inner.x=3", "--inner.pair=[0.2, 0.9]", "--name=c"])
    assert cfg.inner.n == 2 and cfg.inner.flag is False and cfg.inner.x == 3.0 and isinstance(cfg.inner.x, float)
    assert cfg.inner.pair == (0.2, 0.9) and cfg.name == "c"
    assert settings.load_config(Outer, None, ["--inner.flag=true"]).inner.flag is True
    assert settings.parse_value("[image, audio]") == ["image", "audio"] and settings.parse_value("1e-3") == 1e-3
    with pytest.raises(ConfigError, match="--section.key=value"):
        settings.apply_overrides({}, ["--inner.n"])


def test_derived_seeds_are_stable_and_distinct():
    assert runtime.derive_seed(0, "client", 3, 7) == runtime.derive_seed(0, "client", 3, 7)
    assert runtime.derive_seed(0, "client", 3, 7) != runtime.derive_seed(0, "client", 7, 3)
    a = torch.rand(4, generator=runtime.make_generator("cpu", 1, "x"))
    assert torch.equal(a, torch.rand(4, generator=runtime.make_generator("cpu", 1, "x")))


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
