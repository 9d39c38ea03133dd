"""The architecture zoo used by the structure tests, and the equivalence oracle."""
from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from lightning_prune.structure import ChannelGroup, DependencyGraph

# name -> (builder, input size). Small inputs keep CI fast; every model still runs its full topology.
ZOO = {
    "cifar_resnet56": (lambda: _ours("resnet56"), 32),
    "cifar_vgg16_bn": (lambda: _ours("vgg16_bn_cifar"), 32),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(num_classes=10), 32),
    "googlenet": (
        lambda: torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=True), 64
    ),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), 32),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 32),
}


def _ours(name: str) -> nn.Module:
    from lightning_prune.models import create_model

    return create_model(name, num_classes=10)


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    builder, size = ZOO[name]
    torch.manual_seed(seed)
    model = builder()
    randomize_normalization(model, seed)
    model.eval()
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))


def randomize_normalization(model: nn.Module, seed: int) -> None:
    """Give BatchNorm layers non-trivial statistics and affine parameters, so dropping a channel's BatchNorm
    entry is observable if it is done wrong."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def mixes_channels(group: ChannelGroup) -> bool:
    """LayerNorm/GroupNorm over channels make every channel depend on the others, so removing one channel is
    not equivalent to disconnecting it; the oracle does not apply to such groups (shapes are still checked)."""
    return any(isinstance(m.module, (nn.LayerNorm, nn.GroupNorm)) for m in group.members)


def choose_channels(group: ChannelGroup, fraction: float, seed: int) -> list[int]:
    """A seeded random choice of about ``fraction`` of the group's channels, valid for the group."""
    generator = torch.Generator().manual_seed(seed)
    chunk = group.size // group.divisions
    count = max(1, min(chunk - 1, int(round(chunk * fraction))))
    positions = torch.randperm(chunk, generator=generator)[:count].tolist()
    return group.expand_positions(positions)


def disconnect(model: nn.Module, group: ChannelGroup, channels: list[int]) -> None:
    """Zero every consumer weight that reads ``channels`` of ``group`` (in ``model``, found by name)."""
    modules = dict(model.named_modules())
    removed = torch.zeros(group.size, dtype=torch.bool)
    removed[channels] = True
    with torch.no_grad():
        for member in group.consumers:
            index = member.weight_index()
            assert index is not None, f"cannot address the weights of consumer {member.module_name}"
            selected = removed[member.channels]
            target = modules[member.module_name].weight
            target[tuple(ix[selected] for ix in index)] = 0.0


def assert_outputs_close(a, b, atol=1e-4, rtol=1e-4) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    else:
        for x, y in zip(a, b):
            assert_outputs_close(x, y, atol, rtol)


def spread(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (first and last included)."""
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


def graph_for(model: nn.Module, x: torch.Tensor, **kwargs) -> DependencyGraph:
    return DependencyGraph(model, x, **kwargs)


def reference_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
