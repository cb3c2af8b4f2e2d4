import pytest
import torch

from models import ModelConfig, build_model, count_params
from settings import ConfigError


SHAPES = {"image": (3, 16, 16), "audio": (1, 16, 24)}


@pytest.mark.parametrize("arch", ["resnet_tiny", "vit_micro"])
@pytest.mark.parametrize("sharing", ["per_modality", "shared"])
@pytest.mark.parametrize("head", ["shared", "per_modality"])
def test_model_shapes_for_both_modalities(arch, sharing, head):
    m = build_model(ModelConfig(arch=arch, width=16 if arch.startswith("vit") else 8, input_sharing=sharing,
                                head=head, proj_dim=32), SHAPES)
    for mod, shp in SHAPES.items():
        x = torch.randn(4, *shp)
        assert m.features(x, mod).shape == (4, m.feat_dims[mod])
        assert m(x, mod).shape == (4, 32)
    stems = set(m.stems.keys())
    assert stems == ({"shared"} if sharing == "shared" else {"image", "audio"})
    assert set(m.heads.keys()) == ({"shared"} if head == "shared" else {"image", "audio"})


def test_shared_input_has_fewer_parameters_than_per_modality():
    a = build_model(ModelConfig(arch="resnet_tiny", width=8), SHAPES)
    b = build_model(ModelConfig(arch="resnet_tiny", width=8, input_sharing="shared"), SHAPES)
    assert count_params(b) < count_params(a)
    # the only difference is the audio stem: conv 1->8 (3x3) + BN(8)
    assert count_params(a) - count_params(b) == 8 * 1 * 9 + 2 * 8


def test_resnet18_stem_choice_and_size():
    m = build_model(ModelConfig(arch="resnet18"), {"image": (3, 32, 32), "audio": (1, 128, 96)})
    assert m.stems["image"][0].kernel_size == (3, 3)       # CIFAR stem below 64 px
    assert m.stems["audio"][0].kernel_size == (7, 7)       # ImageNet stem at >= 64 px
    trunk = count_params(m.trunk)
    assert 10.5e6 < trunk < 11.5e6                          # ResNet-18 without fc: 11.17M


def test_model_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.arch"):
        ModelConfig(arch="resnet7")
    with pytest.raises(ConfigError, match="model.patch_size"):
        build_model(ModelConfig(arch="vit_micro", patch_size=32), SHAPES)


def test_per_modality_bn_statistics_are_separate_and_affine_shared():
    m = build_model(ModelConfig(arch="resnet_tiny", width=8), SHAPES)
    shared = build_model(ModelConfig(arch="resnet_tiny", width=8, bn_stats="shared"), SHAPES)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in shared.named_parameters()]  # same weights
    m.train()
    m.features(torch.randn(8, *SHAPES["audio"]) * 5 + 3, "audio")
    bn = m.trunk.layers[0].bn1
    assert not torch.equal(bn.running_mean_audio, torch.zeros_like(bn.running_mean_audio))
    assert torch.equal(bn.running_mean_image, torch.zeros_like(bn.running_mean_image))  # untouched by audio
    # eval mode normalises each modality with its own statistics
    m.features(torch.randn(8, *SHAPES["image"]), "image")
    ref = torch.nn.BatchNorm2d(8).eval()
    ref.running_mean.copy_(bn.running_mean_image), ref.running_var.copy_(bn.running_var_image)
    ref.weight.data.copy_(bn.weight), ref.bias.data.copy_(bn.bias)
    x = torch.randn(2, 8, 4, 4)
    bn.eval(), setattr(bn, "modality", "image")
    assert torch.allclose(bn(x), ref(x), atol=1e-6)


def test_cumulative_bn_statistics_reset_per_client():
    from models import key_modality, reset_bn_stats
    m = build_model(ModelConfig(arch="resnet_tiny", width=8), SHAPES)  # bn_momentum=None: cumulative
    m.train()
    xs = [torch.randn(8, *SHAPES["audio"]) * s for s in (1.0, 3.0)]
    for x in xs:
        m.features(x, "audio")
    stem_bn = m.stems["audio"][1]
    # cumulative average over the two batches' per-channel means
    conv = m.stems["audio"][0]
    means = [conv(x).mean(dim=(0, 2, 3)) for x in xs]
    assert torch.allclose(stem_bn.running_mean, (means[0] + means[1]) / 2, atol=1e-5)
    reset_bn_stats(m, ("image",))  # an image client leaves the audio statistics alone ...
    assert stem_bn.num_batches_tracked.item() == 2
    reset_bn_stats(m, ("audio",))  # ... an audio client restarts them
    assert stem_bn.num_batches_tracked.item() == 0 and m.trunk.layers[0].bn1.num_batches_tracked_audio.item() == 0
    assert key_modality("stems.audio.0.weight") == "audio" and key_modality("trunk.layers.0.bn1.running_var_image") == "image"
    assert key_modality("trunk.layers.0.bn1.weight") is None and key_modality("heads.shared.0.weight") is None


def test_batchnorm_settings_on_a_layernorm_backbone_are_refused():
    import pytest
    from models import ModelConfig
    from settings import ConfigError
    with pytest.raises(ConfigError, match=r"model.bn_stats=shared acts on the trunk's BatchNorm, but model.arch=vit_micro "
                                          r"normalises with layer norm: drop it"):
        ModelConfig(arch="vit_micro", bn_stats="shared")
    ModelConfig(arch="vit_micro", bn_momentum=0.1)  # the projection head's BatchNorm reads it
    ModelConfig(arch="resnet_tiny", bn_stats="shared", bn_momentum=0.1)  # where BatchNorm is, both apply
