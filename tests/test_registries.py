"""Each extension point is one registry with at least two real entries, and a new entry needs nothing else: an
objective, a backbone family, a strategy and a dataset added here at run time (as a user adds them in source)
are picked up by the config checks, the local update, the model builder, the server and the data loader."""
import dataclasses

import pytest
import torch

import catalog
import losses
import models
import strategies
from data import DataConfig, DataError
from engine import PretrainConfig
from federation import ClientUpdate, FedConfig, run_round
from helpers import SHAPES, tiny_modalities
from local_update import LocalSettings, OptimConfig, local_ssl_update, make_optimizer
from modality_specs import MODALITIES, MODALITY_SPECS
from partition import holding_kinds
from runtime import make_scaler
from settings import ConfigError


def test_every_registry_has_two_real_entries():
    assert len(losses.OBJECTIVES) >= 2 and len(models.BACKBONES) >= 2 and len(strategies.STRATEGIES) >= 2
    assert len(MODALITY_SPECS) >= 2 and MODALITIES == ("image", "audio")
    assert {s.kind for s in catalog.DATASETS.values()} == {"image", "audio", "both"}


def test_the_backbone_family_decides_memory_format_not_a_name_prefix():
    assert models.backbone_family("resnet18").memory_format == torch.channels_last
    assert models.backbone_family("vit_small").memory_format == torch.contiguous_format
    with pytest.raises(ConfigError, match="model.arch='convmixer'"):
        models.backbone_family("convmixer")


def test_modality_specs_give_batch_sizes_and_holding_kinds():
    optim = OptimConfig(batch_size=64, batch_size_audio=16)
    assert [MODALITY_SPECS[m].batch_size(optim) for m in MODALITIES] == [64, 16]
    assert OptimConfig(batch_size=64).batch_for("audio") == 64
    assert holding_kinds(("image", "audio")) == [("image",), ("audio",), ("image", "audio")]
    with pytest.raises(ConfigError, match=r"expected 3 fractions, one per holding kind \(image, audio, image\+audio\)"):
        PretrainConfig(fed=FedConfig(modality_fractions=(0.5, 0.5)))


def test_a_new_objective_is_one_function_and_one_entry(monkeypatch):
    calls = []

    def mean_cosine(embeds, cfg, cross_modal_negatives=False):
        calls.append(sorted(embeds))
        return {m: -torch.nn.functional.cosine_similarity(z1.float(), z2.float()).mean() for m, (z1, z2) in embeds.items()}
    monkeypatch.setitem(losses.OBJECTIVES, "cosine", losses.Objective(mean_cosine, False))
    cfg = losses.LossConfig(name="cosine")  # the config check reads the registry
    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig(arch="resnet_tiny", width=8), SHAPES)
    data, optim = tiny_modalities(), OptimConfig(batch_size=8)
    out = local_ssl_update(model, make_optimizer(model, optim), make_scaler(torch.device("cpu"), "fp32"), data,
                           {m: torch.arange(16) for m in data}, LocalSettings(DataConfig(), optim, cfg), 0.05,
                           torch.Generator().manual_seed(0), max_steps=3)
    assert len(calls) == 3 and -1.0 <= out["loss_image"] <= 1.0


def test_a_new_backbone_family_is_one_builder_and_one_entry(monkeypatch):
    class Trunk(torch.nn.Module):
        out_dim = 8

        def forward(self, x):
            return x.mean(dim=(2, 3))

    def build(cfg, stem_inputs, modalities):
        return torch.nn.ModuleDict({k: torch.nn.Conv2d(s[0], 8, 3, padding=1) for k, s in stem_inputs.items()}), Trunk()
    monkeypatch.setitem(models.BACKBONES, "pool", models.BackboneFamily({"pool8": ()}, build))
    model = models.build_model(models.ModelConfig(arch="pool8"), SHAPES)
    assert model(torch.randn(2, *SHAPES["audio"]), "audio").shape == (2, 128)


def test_a_new_strategy_is_one_subclass_and_one_entry(monkeypatch):
    """With a hyperparameter too: its Params live in the subclass, the config reads them under fed.strategy, and
    the checks (range, keys of another strategy) come with it; nothing outside the class names them."""
    @dataclasses.dataclass
    class Params:
        step: float = 0.5                # how far toward the average

        def __post_init__(self):
            from settings import check_range
            check_range("fed.strategy.step", self.step, lo=0.0, lo_open=True, hi=1.0)

    class HalfStep(strategies.Strategy):
        """A step toward the clients' average (a toy)."""
        def step(self, g, acc):
            avg = acc.result(g)
            return {k: g[k] + self.params.step * (avg[k] - g[k]) for k in avg}
    HalfStep.Params = Params
    monkeypatch.setitem(strategies.STRATEGIES, "halfstep", HalfStep)
    ups = {i: ClientUpdate(i, {"w": torch.tensor([float(i)])}, {"image": 1}, {"steps": 1}) for i in range(3)}
    for fed, want in ((FedConfig(aggregation="halfstep"), 0.5), (FedConfig(aggregation="halfstep", strategy={"step": 0.25}), 0.25)):
        s = strategies.make_strategy(fed)
        assert run_round({"w": torch.zeros(1)}, [0, 1, 2], ups.__getitem__, strategy=s)[0]["w"].item() == want * 1.0
    cfg = PretrainConfig(fed=FedConfig(aggregation="halfstep", strategy={"step": 0.25}))
    assert cfg.fed.strategy == {"step": 0.25}
    with pytest.raises(ConfigError, match=r"^fed.strategy.step=2.0: must be <= 1.0"):
        FedConfig(aggregation="halfstep", strategy={"step": 2.0})
    with pytest.raises(ConfigError, match=r"fed.strategy.server_lr is not a hyperparameter of fed.aggregation=halfstep "
                                          r"\(it takes step\); it belongs to fed.aggregation=fedavgm"):
        FedConfig(aggregation="halfstep", strategy={"server_lr": 1.0})


def test_a_new_dataset_is_one_reader_and_one_entry(monkeypatch, tmp_path):
    def read(root, cfg, bad):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8).numpy()
        y = (torch.arange(40) % 4).numpy()
        return {"train_x": x[:32], "train_y": y[:32], "test_x": x[32:], "test_y": y[32:], "classes": list("abcd")}
    monkeypatch.setitem(catalog.DATASETS, "toy", catalog.DatasetSpec("image", read, "nothing at all"))
    cfg = DataConfig(dataset="toy+esc50", modalities=("image",), image_root=str(tmp_path), cache_dir=str(tmp_path))
    # an entry that leaves out what its images are is named as such, not later as an edited checkpoint
    with pytest.raises(DataError, match=r"toy: its image inputs come out as \(3, 8, 8\), but its DATASETS entry declares "
                                        r"channels=3, size=0 \(so \(3, 64, 64\)\): set the entry's channels and size"):
        catalog.load_data(cfg, "cpu")
    monkeypatch.setitem(catalog.DATASETS, "toy", catalog.DatasetSpec("image", read, "nothing at all", channels=3, size=8))
    assert catalog.load_data(cfg, "cpu")["image"].shape == (3, 8, 8)
    missing = dataclasses.replace(cfg, dataset="cifar10+esc50", image_root=str(tmp_path / "none"))
    with pytest.raises(DataError, match=r"Expected layout: cifar-10-batches-py"):
        catalog.load_data(missing, "cpu")


@pytest.mark.parametrize("tier", ["device", "disk"])
def test_a_new_modality_is_built_in_the_residency_tier_the_run_asks_for(monkeypatch, tmp_path, tier):
    """A third modality's arrays (Sobel-like uint8 maps here) go through catalog.convert like image and audio: one
    BUILDERS entry, and data.residency places its samples (disk: memory-mapped files named for that modality)."""
    import functools
    import numpy as np
    from data import image_modality, stored_bytes
    g = np.random.default_rng(0)
    arrays = {"train_x": g.integers(0, 256, (24, 1, 8, 8), dtype=np.uint8), "train_y": np.arange(24) % 3,
              "test_x": g.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8), "test_y": np.arange(6) % 3,
              "classes": ["a", "b", "c"], "source": "toy-edges"}
    cfg = DataConfig(residency=tier, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"modality 'edges' has no catalog.BUILDERS entry: add one"):
        catalog.convert({"edges": arrays}, cfg, "cpu")
    monkeypatch.setitem(catalog.BUILDERS, "edges", catalog.ModalityBuilder(
        functools.partial(image_modality, modality="edges"), stored_bytes))
    md = catalog.convert({"edges": arrays}, cfg, "cpu")["edges"]
    assert md.residency == tier and torch.equal(md.train_x, torch.from_numpy(arrays["train_x"]))
    assert (len(md.maps) == 2) == (tier == "disk")
    if tier == "disk":  # its own files, apart from an image modality built from the same source
        files = sorted((tmp_path / "resident").glob("*.npy"))
        assert len(files) == 2
        catalog.convert({"image": arrays}, cfg, "cpu")
        assert len(sorted((tmp_path / "resident").glob("*.npy"))) == 4
