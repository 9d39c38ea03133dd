"""``python -m lightning_prune.analysis``: criteria analysis of a saved model.

Examples::

    python -m lightning_prune.analysis --model resnet20 --out analysis/            # freshly initialised
    python -m lightning_prune.analysis --model resnet56 --checkpoint last.ckpt --out analysis/
    python -m lightning_prune.analysis --checkpoint last.ckpt --out analysis/       # model from hyper-parameters

The checkpoint is a ``torch.save``d state dict or a Lightning checkpoint, loaded with ``weights_only=True``.
For a Lightning checkpoint of :class:`lightning_prune.ClassificationModule`, ``--model``, ``--num-classes``,
``--in-channels`` and ``--model-kwargs`` default to its hyper-parameters, and the ``model.`` prefix of its keys is
stripped. A checkpoint of a pruned model is rebuilt from its pruning plan (a ``{"format", "groups", ...}`` dict
found in the checkpoint, or ``--plan plan.json``) before loading.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

_DEFAULT_SHAPES = {"digits_cnn": (1, 8, 8)}


def _find_plan(obj: Any, depth: int = 0) -> dict | None:
    """A pruning plan dict (``PruningPlan.to_dict()``) anywhere in a loaded checkpoint."""
    if depth > 4 or not isinstance(obj, dict):
        return None
    if "groups" in obj and ("format" in obj or "version" in obj) and isinstance(obj.get("groups"), dict):
        groups = obj["groups"]
        if all(isinstance(v, dict) and "kept" in v for v in groups.values()):
            return obj
    for key, value in obj.items():
        if key == "state_dict":
            continue
        found = _find_plan(value, depth + 1)
        if found is not None:
            return found
    return None


MODULE_PREFIX = "model."


def _state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The network's weights: a Lightning checkpoint's ``state_dict`` with the LightningModule's ``model.``
    prefix stripped, or a plain state dict as is."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit("checkpoint: expected a state dict or a Lightning checkpoint with a 'state_dict' entry.")
    stripped = {k[len(MODULE_PREFIX):]: v for k, v in state.items() if k.startswith(MODULE_PREFIX)}
    return stripped if stripped else dict(state)


def _strip_plan_prefix(plan: dict) -> dict:
    """A plan recorded on the LightningModule names its groups ``model.<layer>``; the network analysed here is
    the bare ``model`` (its state dict loses the same prefix in :func:`_state_dict`), so its group names lose it
    too. A plan of a bare network is returned as is."""
    groups = plan.get("groups") or {}
    if not groups or not all(name.startswith(MODULE_PREFIX) for name in groups):
        return plan
    return {**plan, "groups": {name[len(MODULE_PREFIX):]: entry for name, entry in groups.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_prune.analysis", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="state dict or Lightning checkpoint (loaded weights_only)")
    p.add_argument("--model", help="model name for lightning_prune.models.create_model (e.g. resnet20)")
    p.add_argument("--num-classes", type=int, default=None, help="default: checkpoint hparams, else 10")
    p.add_argument("--in-channels", type=int, default=None, help="default: checkpoint hparams, else input shape")
    p.add_argument("--model-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"width": 8}\'')
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="example input shape (default 3 32 32; 1 8 8 for digits_cnn)")
    p.add_argument("--plan", type=Path, help="pruning plan JSON of a pruned checkpoint")
    p.add_argument("--criteria", nargs="+", default=["l1", "l2", "fpgm"], help="weight criteria to compare")
    p.add_argument("--target", type=float, default=0.5, help="channel sparsity for overlaps and global ratios")
    p.add_argument("--cv-threshold", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory (report.json, PNGs)")
    p.add_argument("--no-figures", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..models import create_model
    from ..structure import DependencyGraph, PruningPlan, apply_plan
    from . import analyze

    checkpoint = None
    hparams: dict[str, Any] = {}
    if args.checkpoint is not None:
        try:
            checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - report any load failure plainly
            raise SystemExit(f"checkpoint: cannot load {args.checkpoint} with weights_only=True: {error}")
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("hyper_parameters"), dict):
            hparams = checkpoint["hyper_parameters"]
    name = args.model or hparams.get("model")
    if not isinstance(name, str):
        raise SystemExit("--model is required (the checkpoint has no 'model' hyper-parameter).")
    shape = tuple(args.input_shape) if args.input_shape else None
    in_channels = args.in_channels or hparams.get("in_channels") or (shape[0] if shape else None)
    if in_channels is None:
        in_channels = _DEFAULT_SHAPES.get(name, (3,))[0]
    if shape is None:
        shape = hparams.get("example_input_shape") or (in_channels, *_DEFAULT_SHAPES.get(name, (3, 32, 32))[1:])
    num_classes = args.num_classes or hparams.get("num_classes") or 10
    model_kwargs = args.model_kwargs if args.model_kwargs is not None else (hparams.get("model_kwargs") or {})
    model = create_model(name, num_classes=int(num_classes), in_channels=int(in_channels), **model_kwargs)
    example = torch.randn(2, *(int(s) for s in shape), generator=torch.Generator().manual_seed(args.seed))

    graph = None
    plan = json.loads(args.plan.read_text()) if args.plan else (_find_plan(checkpoint) if checkpoint else None)
    if plan is not None and not PruningPlan.from_dict(plan).is_empty():
        graph = apply_plan(model, _strip_plan_prefix(plan), example)
    if checkpoint is not None:
        try:
            model.load_state_dict(_state_dict(checkpoint))
        except RuntimeError as error:
            raise SystemExit(f"checkpoint: weights do not fit {name!r} ({error}). For a pruned model pass its "
                             "pruning plan with --plan.")
    if graph is None:
        graph = DependencyGraph(model, example)
    model.eval()
    report = analyze(model, example, args.criteria, target=args.target, graph=graph, cv_threshold=args.cv_threshold,
                     alpha=args.alpha, seed=args.seed,
                     meta={"model_name": name, "checkpoint": str(args.checkpoint) if args.checkpoint else None})
    args.out.mkdir(parents=True, exist_ok=True)
    written = [report.to_json(args.out / "report.json")]
    if not args.no_figures:
        written += report.save_figures(args.out)
    print(report.summary())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
