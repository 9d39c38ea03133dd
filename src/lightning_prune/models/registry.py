"""A timm-style model registry: ``create_model("resnet56", num_classes=10)``.

Names resolve in this order:

1. Models registered with :func:`register_model` -- the built-in ones are ``resnet20``,
   ``resnet32``, ``resnet56``, ``resnet110`` (CIFAR ResNets), ``vgg16_bn_cifar`` (CIFAR VGG-16
   with BatchNorm) and ``digits_cnn``. Registered names win when they clash with torchvision's.
2. ``tv_<name>``: the torchvision classification model ``<name>``, always (e.g. ``tv_resnet18``).
3. ``<name>``: any torchvision classification model by its plain name (e.g. ``resnet18``).

So ``vgg16_bn`` is torchvision's ImageNet VGG-16-BN and ``vgg16_bn_cifar`` is ours.
torchvision models are always built with ``weights=None`` (nothing is downloaded) and
accept only ``in_channels=3``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["TORCHVISION_PREFIX", "available_models", "create_model", "register_model"]

TORCHVISION_PREFIX = "tv_"

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name``.

    The factory must accept ``num_classes`` and ``in_channels`` keyword arguments (plus any
    model-specific keyword arguments, which :func:`create_model` passes through)::

        @register_model("my_net")
        def my_net(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module:
            ...

    Raises:
        ValueError: if ``name`` is already registered to a different factory, or starts with
            the reserved ``tv_`` prefix.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model names starting with {TORCHVISION_PREFIX!r} are reserved for torchvision models: {name!r}")

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(name)
        # Re-registering the same function (e.g. after importlib.reload) is harmless.
        if existing is not None and _qualified_name(existing) != _qualified_name(factory):
            raise ValueError(f"model name {name!r} is already registered to {_qualified_name(existing)}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _torchvision_models() -> list[str]:
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))


def available_models(pattern: str | None = None) -> list[str]:
    """Sorted names accepted by :func:`create_model`: registered models plus torchvision's.

    torchvision classification models are listed by their plain name; every one of them is
    also accepted with the ``tv_`` prefix. Plain torchvision names shadowed by a registered
    model are listed only as ``tv_<name>``.

    Args:
        pattern: Optional shell-style filter, e.g. ``"resnet*"``.
    """
    names = set(_REGISTRY)
    for tv_name in _torchvision_models():
        names.add(TORCHVISION_PREFIX + tv_name if tv_name in _REGISTRY else tv_name)
    result = sorted(names)
    if pattern is not None:
        result = [name for name in result if fnmatch.fnmatchcase(name, pattern)]
    return result


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the model called ``name`` (see the module docstring for name resolution).

    Args:
        name: A name from :func:`available_models` or ``tv_<torchvision name>``.
        num_classes: Size of the classifier output.
        in_channels: Number of input image channels (must be 3 for torchvision models).
        **kwargs: Passed to the model factory (e.g. ``width`` for ``digits_cnn``, or
            torchvision constructor options such as ``dropout``).

    Raises:
        ValueError: for an unknown name (with close matches), or ``in_channels != 3`` for a
            torchvision model.
    """
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)

    tv_names = set(_torchvision_models())
    tv_name = name[len(TORCHVISION_PREFIX) :] if name.startswith(TORCHVISION_PREFIX) else name
    if tv_name in tv_names:
        if in_channels != 3:
            raise ValueError(
                f"model={name!r} is a torchvision model, which only supports in_channels=3, got "
                f"in_channels={in_channels}. Use one of this package's models ({', '.join(sorted(_REGISTRY))}) "
                "or convert the images to 3 channels."
            )
        if "weights" in kwargs and kwargs["weights"] is not None:
            raise ValueError(f"model={name!r}: pretrained weights are not supported (weights must be None)")
        kwargs.pop("weights", None)
        import torchvision.models

        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)

    candidates = available_models() + [TORCHVISION_PREFIX + n for n in tv_names]
    matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(matches)}." if matches else ""
    raise ValueError(
        f"Unknown model={name!r}.{hint} Call lightning_prune.models.available_models() to list all "
        f"{len(available_models())} names."
    )
