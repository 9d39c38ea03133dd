"""Model zoo and registry: forward shapes, parameter counts, name resolution and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune.models import (
    CifarResNet,
    CifarVGG,
    DigitsCNN,
    available_models,
    create_model,
    register_model,
)
from lightning_prune.models import registry as registry_module


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56"])
def test_cifar_resnets_forward_shape(name):
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet110_forward_shape_and_depth():
    model = create_model("resnet110", num_classes=100).eval()
    assert isinstance(model, CifarResNet)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [18, 18, 18]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_resnet_parameter_counts_match_the_paper():
    # He et al.: ResNet-20 0.27M, ResNet-56 0.85M parameters (option A). Option-B projection
    # shortcuts add 2 * (conv 1x1 + BN) = 2,752 parameters.
    assert 0.265e6 < count_parameters(create_model("resnet20")) < 0.28e6
    assert 0.845e6 < count_parameters(create_model("resnet56")) < 0.865e6


def test_resnet_uses_projection_shortcuts_only_where_shape_changes():
    model = create_model("resnet20")
    downsamples = [name for name, m in model.named_modules() if name.endswith("downsample")]
    assert downsamples == ["layer2.0.downsample", "layer3.0.downsample"]
    conv = model.layer2[0].downsample[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)


def test_resnet_rejects_invalid_depth():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


def test_resnet_in_channels():
    model = create_model("resnet20", num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_vgg16_bn_cifar_structure_and_other_input_sizes():
    model = create_model("vgg16_bn_cifar", num_classes=100).eval()
    assert isinstance(model, CifarVGG)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 512), (512, 100)]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 100)  # thanks to the adaptive pool


@pytest.mark.parametrize("size", [8, 16, 28])
def test_digits_cnn_forward_any_size(size):
    model = create_model("digits_cnn", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, size, size)).shape == (3, 10)


def test_digits_cnn_width_and_flatten_linear():
    model = create_model("digits_cnn", in_channels=1, width=8)
    assert isinstance(model, DigitsCNN)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    first_linear = model.classifier[1]
    # Every channel of the last conv becomes 2x2 = 4 features of the first linear layer.
    assert isinstance(model.classifier[0], nn.Flatten)
    assert first_linear.in_features == 32 * 4 and first_linear.out_features == 64
    with pytest.raises(ValueError, match="width"):
        DigitsCNN(width=0)


def test_available_models_lists_ours_and_torchvision():
    names = available_models()
    for ours in ["resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn_cifar", "digits_cnn"]:
        assert ours in names
    assert {"resnet18", "vgg16_bn", "mobilenet_v2"} <= set(names)
    assert names == sorted(names)
    assert available_models("resnet*") == [n for n in names if n.startswith("resnet")]
    assert "resnet56" in available_models("resnet*")


def test_torchvision_models_plain_and_prefixed():
    import torchvision

    plain = create_model("resnet18", num_classes=7)
    prefixed = create_model("tv_resnet18", num_classes=7)
    assert type(plain) is type(prefixed) is torchvision.models.ResNet
    assert plain.fc.out_features == 7
    with torch.no_grad():
        assert plain.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_vgg16_bn_is_torchvision_and_vgg16_bn_cifar_is_ours():
    import torchvision

    assert type(create_model("vgg16_bn", num_classes=10)) is torchvision.models.VGG
    assert isinstance(create_model("vgg16_bn_cifar", num_classes=10), CifarVGG)


def test_torchvision_model_rejects_other_in_channels():
    with pytest.raises(ValueError, match="in_channels=3") as info:
        create_model("tv_resnet18", in_channels=1)
    assert "in_channels=1" in str(info.value)


def test_unknown_model_error_lists_close_matches():
    with pytest.raises(ValueError) as info:
        create_model("resnet21")
    message = str(info.value)
    assert "model='resnet21'" in message
    assert "resnet20" in message
    assert "available_models()" in message


def test_unknown_model_without_close_matches():
    with pytest.raises(ValueError, match="available_models") as info:
        create_model("zzzzqqqq")
    assert "Close matches" not in str(info.value)


@pytest.fixture
def clean_registry():
    before = dict(registry_module._REGISTRY)
    yield
    registry_module._REGISTRY.clear()
    registry_module._REGISTRY.update(before)


def test_register_model_and_kwargs_passthrough(clean_registry):
    @register_model("tiny_test_net")
    def tiny_test_net(num_classes: int = 10, in_channels: int = 3, hidden: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, hidden), nn.Linear(hidden, num_classes))

    assert "tiny_test_net" in available_models()
    model = create_model("tiny_test_net", num_classes=3, in_channels=1, hidden=6)
    assert model[1].out_features == 6
    assert model(torch.randn(2, 1, 2, 2)).shape == (2, 3)


def test_registered_model_shadows_torchvision_name(clean_registry):
    @register_model("resnet18")
    def my_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(20, num_classes, in_channels)

    assert isinstance(create_model("resnet18"), CifarResNet)
    assert not isinstance(create_model("tv_resnet18"), CifarResNet)
    names = available_models()
    assert "tv_resnet18" in names and names.count("resnet18") == 1


def test_register_model_rejects_duplicates_and_reserved_prefix(clean_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(lambda num_classes=10, in_channels=3: nn.Identity())
    with pytest.raises(ValueError, match="reserved"):
        register_model("tv_mine")
