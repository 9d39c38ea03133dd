"""fvcore's FLOP count without fvcore's JIT trace: the same per-op rules, read during an ordinary forward.

fvcore counts a model by tracing it with ``torch.jit`` and applying one rule per traced ATen op (convolution,
linear/matmul family, normalizations, bilinear/nearest upsampling, adaptive average pooling, grid sampling);
every other op costs nothing. A trace is a forward plus a TorchScript graph plus a walk over it, paid once per
prune event. :class:`FvcoreRules` applies the same rules to the torch functions an eager forward calls (a
``TorchFunctionMode``), attributing each count to the innermost module whose ``forward`` is running and to every
module above it by name, like fvcore's ``by_module()``. It runs inside a forward the event makes anyway (the
graph's eval-mode trace).

It only ever answers when it is sure: a Python-level torch function it does not know (``torch.einsum``, an
attention helper that calls ``linear`` inside) might hide counted ops, so the count is then *unverified* and the
caller counts with fvcore as before. ``tests/test_flop_counting.py`` proves equality with fvcore, module by
module, on the test zoo, more torchvision families and every op family called functionally;
``benchmarks/flop_counting.py`` on every torchvision classification model and the timm zoo.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor


def _numel(x: Any) -> int:
    return int(x.numel()) if isinstance(x, Tensor) else 0


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class Unverified(Exception):
    """The forward called something whose fvcore count this module cannot reproduce exactly."""


# -- fvcore's rules (fvcore/nn/jit_handles.py), keyed by the torch function that emits the traced op -------------
def _conv(transposed: bool | None) -> Callable:
    def count(args: tuple, kwargs: dict, out: Any) -> int:
        x, w = args[0], _arg(args, kwargs, 1, "weight")
        is_transposed = bool(_arg(args, kwargs, 6, "transposed")) if transposed is None else transposed
        batched = x.dim() == w.dim()
        batch = x.shape[0] if batched else 1
        spatial = (x if is_transposed else out).shape[(2 if batched else 1):]
        return batch * w.numel() * math.prod(spatial)

    return count


def _linear(args: tuple, kwargs: dict, out: Any) -> int:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    return x.numel() * w.shape[0]


def _matmul(a: Tensor, b: Tensor) -> int:
    if b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise Unverified("matmul with a vector operand (fvcore's rule does not apply)")
    return a.numel() * b.shape[-1]


def _addmm(args: tuple, kwargs: dict, out: Any) -> int:
    a, b = _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    if a.dim() != 2 or b.dim() != 2:
        raise Unverified("addmm on non-matrices")
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(args: tuple, kwargs: dict, out: Any) -> int:
    a, b = args[0], _arg(args, kwargs, 1, "mat2")
    n, c, t = a.shape
    return n * c * t * b.shape[-1]


def _norm(numel: int, affine: bool, dims: int) -> int:
    if not 2 <= dims <= 5:
        raise Unverified("normalization of a tensor fvcore does not count")
    return numel * (5 if affine else 4)


def _batch_norm(weight_index: int, training_index: int) -> Callable:
    def count(args: tuple, kwargs: dict, out: Any) -> int:
        x = args[0]
        affine = _arg(args, kwargs, weight_index, "weight") is not None
        if _arg(args, kwargs, training_index, "training", False):
            return _norm(x.numel(), affine, x.dim())
        return x.numel() * (2 if affine else 1)

    return count


def _affine_norm(weight_index: int) -> Callable:
    def count(args: tuple, kwargs: dict, out: Any) -> int:
        return _norm(args[0].numel(), _arg(args, kwargs, weight_index, "weight") is not None, args[0].dim())

    return count


def _instance_norm(args: tuple, kwargs: dict, out: Any) -> int:
    return _norm(args[0].numel(), _arg(args, kwargs, 3, "weight") is not None, args[0].dim())


def _input_numel(args: tuple, kwargs: dict, out: Any) -> int:
    return _numel(args[0])


def _interpolation(mode_index: int, default_mode: str, antialias_index: int | None) -> Callable:
    """``F.interpolate`` and its deprecated aliases: which ATen op the mode and rank select decides the count."""

    def count(args: tuple, kwargs: dict, out: Any) -> int:
        x = args[0]
        mode = _arg(args, kwargs, mode_index, "mode", default_mode)
        antialias = antialias_index is not None and bool(_arg(args, kwargs, antialias_index, "antialias", False))
        if x.dim() != 4:
            return 0  # 1-d/3-d upsampling and pooling ops: fvcore counts none of them
        if mode == "nearest":
            return _numel(out)
        if mode == "bilinear" and not antialias:
            return 4 * _numel(out)
        if mode == "area":
            return x.numel()  # adaptive_avg_pool2d
        return 0

    return count


def _out_times(factor: int) -> Callable:
    def count(args: tuple, kwargs: dict, out: Any) -> int:
        return factor * _numel(out)

    return count


def _build_rules() -> dict[Any, Callable[[tuple, dict, Any], int]]:
    rules: dict[Any, Callable[[tuple, dict, Any], int]] = {
        torch.conv1d: _conv(False), torch.conv2d: _conv(False), torch.conv3d: _conv(False),
        torch.conv_transpose1d: _conv(True), torch.conv_transpose2d: _conv(True), torch.conv_transpose3d: _conv(True),
        torch.convolution: _conv(None), torch._convolution: _conv(None),
        F.linear: _linear,
        torch.addmm: _addmm, Tensor.addmm: _addmm,
        torch.bmm: _bmm, Tensor.bmm: _bmm,
        F.batch_norm: _batch_norm(3, 5), torch.batch_norm: _batch_norm(1, 5),
        F.layer_norm: _affine_norm(2), torch.layer_norm: _affine_norm(2),
        F.group_norm: _affine_norm(2), torch.group_norm: _affine_norm(2),
        F.instance_norm: _instance_norm, torch.instance_norm: _affine_norm(1),
        F.adaptive_avg_pool2d: _input_numel, torch._C._nn.adaptive_avg_pool2d: _input_numel,
        F.interpolate: _interpolation(3, "nearest", 6), F.upsample: _interpolation(3, "nearest", None),
        F.upsample_nearest: _interpolation(99, "nearest", None),
        F.upsample_bilinear: _interpolation(99, "bilinear", None),
        torch._C._nn.upsample_nearest2d: _out_times(1), torch._C._nn.upsample_bilinear2d: _out_times(4),
        F.grid_sample: _out_times(4), torch.grid_sampler: _out_times(4), torch.grid_sampler_2d: _out_times(4),
    }
    for matmul in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm):
        rules[matmul] = lambda args, kwargs, out: _matmul(args[0], args[1])
    rules[Tensor.__rmatmul__] = lambda args, kwargs, out: _matmul(args[1], args[0])
    return rules


_RULES = _build_rules()

#: Python-level torch functions known to emit no op fvcore counts (activations, pooling, dropout, splitting,
#: Tensor's Python-defined operators). Any other Python-level torch function makes the count unverified.
_FREE_PYTHON = {
    getattr(owner, name) for owner, names in (
        (F, "relu relu_ relu6 hardtanh hardtanh_ elu elu_ selu selu_ celu celu_ leaky_relu leaky_relu_ gelu silu "
            "mish hardswish hardsigmoid sigmoid tanh softmax log_softmax softmin softplus softsign glu threshold "
            "threshold_ rrelu prelu logsigmoid tanhshrink hardshrink softshrink dropout dropout1d dropout2d "
            "dropout3d alpha_dropout feature_alpha_dropout max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d "
            "avg_pool3d lp_pool1d lp_pool2d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d "
            "adaptive_avg_pool1d adaptive_avg_pool3d normalize pad pixel_shuffle pixel_unshuffle channel_shuffle "
            "embedding one_hot"),
        (Tensor, "split __rsub__ __rdiv__ __rtruediv__ __pow__ __rpow__ __ipow__ __floordiv__ __rfloordiv__ "
                 "__rlshift__ __rrshift__ __format__ __len__ __iter__ __contains__ __reversed__ __hash__ "
                 "__array__ unflatten norm unique __deepcopy__ __reduce_ex__ __eq__ __ne__"),
        (torch, "_assert split norm unique broadcast_tensors meshgrid atleast_1d atleast_2d atleast_3d chunk"),
    ) for name in names.split() if hasattr(owner, name)
}


def _is_builtin(func: Any) -> bool:
    """A C-implemented torch function: it emits exactly the one op it names (counted by its rule, if any)."""
    return not isinstance(func, (types.FunctionType, types.MethodType)) and not hasattr(func, "__wrapped__")


class FvcoreRules(TorchFunctionMode):
    """Counts, per module name, what fvcore would count for the torch functions called while it is active.

    ``counts[""]`` is the total; ``unverified`` names the first call that could not be counted exactly."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._names = {module: name for name, module in model.named_modules()}
        self.counts: dict[str, int] = dict.fromkeys(self._names.values(), 0)
        self.unverified: str | None = None
        self._stack: list[str] = []

    def __torch_function__(self, func: Any, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.unverified is not None:
            return out
        rule = _RULES.get(func)
        if rule is None:
            if not _is_builtin(func) and func not in _FREE_PYTHON:
                self.unverified = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', func)}"
            return out
        try:
            flops = int(rule(args, kwargs, out))
        except Unverified as why:
            self.unverified = str(why)
            return out
        except Exception as error:  # an argument form the rule does not read: fvcore decides
            self.unverified = f"{getattr(func, '__name__', func)}: {type(error).__name__}: {error}"
            return out
        if flops:
            self.counts[""] += flops
            for name in self._scopes():
                self.counts[name] += flops
        return out

    def _scopes(self) -> list[str]:
        """Like fvcore's ``by_module()``: the innermost running module and every module above it by name."""
        if not self._stack:
            return []
        parts = self._stack[-1].split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(module)
        if name:
            self._stack.append(name)

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._names.get(module)
        if name and self._stack and self._stack[-1] == name:
            self._stack.pop()

    @contextlib.contextmanager
    def active(self) -> Iterator["FvcoreRules"]:
        """Count during the forward run inside this block (module scopes from global forward hooks)."""
        hooks = nn.modules.module
        pre = hooks.register_module_forward_pre_hook(self._enter_module)
        post = hooks.register_module_forward_hook(self._leave_module, always_call=True)
        try:
            with self:
                yield self
        finally:
            pre.remove()
            post.remove()

    def result(self) -> dict[str, int] | None:
        """fvcore's ``by_module()`` for the forward counted, or None when it could not be reproduced exactly."""
        return None if self.unverified is not None or self._stack else dict(self.counts)
