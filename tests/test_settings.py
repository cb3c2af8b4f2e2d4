"""settings.py: typed configs from YAML and dotted overrides, errors that name the key, and base: inheritance."""
from dataclasses import dataclass, field

import pytest

import settings
from settings import ConfigError, load_config
from helpers import ROOT


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


def test_a_config_inherits_its_base_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("inner:\n  n: 2\n  x: 0.25\nname: b\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\ninner:\n  x: 0.75\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nname: leaf\n")
    cfg = settings.load_config(Outer, tmp_path / "sub" / "leaf.yaml", ["--inner.flag=true"])
    assert (cfg.inner.n, cfg.inner.x, cfg.inner.flag, cfg.name) == (2, 0.75, True, "leaf")
    assert "base" not in settings.read_yaml(tmp_path / "sub" / "leaf.yaml")


def test_bad_bases_end_with_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherit in a loop"):
        settings.read_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        settings.read_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="is a directory: give a YAML file"):
        settings.read_yaml(tmp_path)



def test_an_empty_config_a_duplicated_section_and_a_bad_device_end_with_one_line(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty: give at least one section, or `base: default.yaml`"):
        settings.read_yaml(tmp_path / "empty.yaml")
    (tmp_path / "dup.yaml").write_text("inner:\n  n: 1\nname: a\ninner:\n  x: 2.0\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'inner' appears twice in one section \(line 4\)"):
        settings.read_yaml(tmp_path / "dup.yaml")
    with pytest.raises(ConfigError, match=r"run.device='cuda:x': expected auto, cpu, cuda or cuda:N"):
        settings.RunConfig(device="cuda:x")
    assert settings.RunConfig(device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("override, message", [
    ("--data.image_aug.crop_scale=[0.5]", "data.image_aug.crop_scale=[0.5]: expected a list of 2 (float, float)"),
    ("--data.image_aug.jitter=[0.4]", "data.image_aug.jitter=[0.4]: expected a list of 4 (float, float, float, float)"),
    ("--data.image_aug.jitter=[0.4, 0.4, 0.4, 0.9]", "data.image_aug.jitter[3] (hue)=0.9: must be <= 0.5"),
    ("--data.image_aug.jitter=[0.4, 'a', 0.4, 0.1]", "data.image_aug.jitter[1]='a': expected a number"),
    ("--data.image_aug.crop_scale=[0, 1]", "data.image_aug.crop_scale[0]=0.0: must be > 0.0"),
    ("--data.image_aug.crop_ratio=[2, 1]", "data.image_aug.crop_ratio=[2.0, 1.0]: expected [low, high]"),
    ("--data.image_aug.blur_sigma=[3, 1]", "data.image_aug.blur_sigma=[3.0, 1.0]: expected [low, high]"),
    ("--data.audio_aug.noise_snr_db=[30, 5]", "data.audio_aug.noise_snr_db=[30.0, 5.0]: expected [low, high]"),
    ("--data.audio_aug.freq_masks=-1", "data.audio_aug.freq_masks=-1: must be >= 0"),
    ("--data.audio_aug.gain_db=-3", "data.audio_aug.gain_db=-3.0: must be >= 0.0"),
])
def test_every_augmentation_range_and_tuple_is_checked_by_name(override, message):
    from engine import PretrainConfig
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, ROOT / "configs" / "smoke.yaml", [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
