"""Physical surgery end to end: pruned models train and evaluate, prune again, rebuild from a plan, save/load;
protected outputs and ``ignore``; optimizer transplant (state slicing, schedulers); clear errors that leave the
model untouched; rollback of a surgery that fails midway; bounded graph building; FLOPs counting.

CIFAR-sized inputs (32x32; GoogLeNet 64x64) keep every test fast on CPU.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from lightning_prune import criteria
from lightning_prune.errors import GraphBuildTimeout, PruningError, UnsupportedModelError
from lightning_prune.structure import (
    DependencyGraph,
    FlopsModel,
    PruningPlan,
    apply_plan,
    count_flops,
    transplant_optimizer,
)

from .zoo import randomize_normalization



# -- models ----------------------------------------------------------------------------------------------------
class FlattenCNN(nn.Module):
    """conv-bn-relu x2, then flatten straight into a Linear: each channel of conv2 is read at 4x4 positions."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32),
    "googlenet": (lambda: torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=True), 64),
    "flatten_cnn": (lambda: FlattenCNN(), 8),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    builder, size = MODELS[name]
    torch.manual_seed(seed)
    model = builder()
    randomize_normalization(model, seed)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval(), x


def every_other(group, fraction: float = 0.25) -> list[int]:
    """A deterministic, valid removal of about ``fraction`` of a group (whole grouped-conv chunks)."""
    chunk = group.size // group.divisions
    count = max(1, min(chunk - 1, int(chunk * fraction)))
    return group.expand_positions(range(0, 2 * count, 2)[:count] if 2 * count <= chunk else range(count))


def prune_all(graph: DependencyGraph, fraction: float = 0.25):
    return graph.prune_groups({g.name: every_other(g, fraction) for g in graph.groups})


def tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [o for o in output if isinstance(o, torch.Tensor)]


def model_fingerprint(model: nn.Module) -> tuple[dict, dict]:
    """Every state-dict tensor (cloned) and every module's shape attributes, to compare before/after."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_channels")
    attrs = {
        name: (type(m).__name__, tuple(getattr(m, k, None) for k in keys), m.training)
        for name, m in model.named_modules()
    }
    return state, attrs


def assert_unchanged(model: nn.Module, fingerprint: tuple[dict, dict]) -> None:
    state, attrs = fingerprint
    now_state, now_attrs = model_fingerprint(model)
    assert now_attrs == attrs
    assert now_state.keys() == state.keys()
    for key, value in state.items():
        assert now_state[key].shape == value.shape, key
        assert torch.equal(now_state[key], value), key


# -- pruned models work ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_model_trains_and_evaluates(name):
    model, x = build(name)
    graph = DependencyGraph(model, x)
    params_before = sum(p.numel() for p in model.parameters())
    prune_all(graph)
    assert sum(p.numel() for p in model.parameters()) < params_before

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape[0] == 2 and torch.isfinite(out).all()

    model.train()
    output = model(x)
    outs = tensors(output)
    if name == "googlenet":  # auxiliary heads run in train mode only; they must exist and read pruned inputs
        assert len(outs) == 3 and output.aux_logits1 is not None and output.aux_logits2 is not None
        assert all(o.shape == (2, 10) for o in outs)
        inception4a = sum(b.out_channels for b in (
            model.inception4a.branch1.conv, model.inception4a.branch2[1].conv,
            model.inception4a.branch3[1].conv, model.inception4a.branch4[1].conv,
        ))
        assert model.aux1.conv.conv.in_channels == inception4a < 512
        assert model.aux1.fc1.in_features == model.aux1.conv.conv.out_channels * 16
    loss = sum(o.float().pow(2).mean() for o in outs)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient after pruning: {missing[:5]}"
    if name == "googlenet":
        assert model.aux1.fc2.weight.grad.abs().sum() > 0 and model.aux2.fc1.weight.grad.abs().sum() > 0


def test_flatten_linear_keeps_each_channel_positions():
    model, x = build("flatten_cnn")
    reference = copy.deepcopy(model)
    graph = DependencyGraph(model, x)
    group = graph.group("conv2")
    member = next(m for m in group.consumers if m.module_name == "fc1")
    assert len(member.positions) == 6 * 16  # every channel read at 4x4 positions
    graph.prune("conv2", [1, 4])
    kept = [c for c in range(6) if c not in (1, 4)]
    assert model.fc1.in_features == 4 * 16
    expected = reference.fc1.weight.view(12, 6, 16)[:, kept].reshape(12, -1)
    torch.testing.assert_close(model.fc1.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet", "flatten_cnn"])
def test_second_round_composes_and_plan_rebuilds_exactly(name, tmp_path):
    model, x = build(name)
    original = copy.deepcopy(model)
    graph = DependencyGraph(model, x)
    first = {g.name: every_other(g, 0.25) for g in graph.groups}
    graph.prune_groups(first)

    # Second round on the already pruned model: a new graph that continues the plan.
    graph2 = DependencyGraph(model, x, plan=graph.plan)
    assert {g.name: g.size for g in graph2.groups} == graph.widths()
    second = {g.name: [0, 1] for g in graph2.groups if g.divisions == 1 and g.size > 3}
    graph2.prune_groups(second)
    plan = graph2.plan
    assert len(plan.events) == 2
    for name_, record in plan.groups.items():
        size = record.original_size
        kept1 = [i for i in range(size) if i not in set(first.get(name_, []))]
        kept2 = [c for i, c in enumerate(kept1) if i not in set(second.get(name_, []))]
        assert record.kept == kept2, name_  # original indices, composed over both rounds
        assert graph2.group(name_).size == len(kept2)
        assert graph2.group(name_).original_size == size
    root = graph2.groups[0]
    root_conv = root.producers[0].module_name
    kept = plan.groups[root.name].kept
    torch.testing.assert_close(
        dict(model.named_modules())[root_conv].weight,
        dict(original.named_modules())[root_conv].weight[kept],
        rtol=0, atol=0,
    )

    # The plan round-trips through JSON and rebuilds the architecture on a fresh model.
    restored_plan = PruningPlan.from_json(plan.to_json())
    assert restored_plan.to_dict() == plan.to_dict() and restored_plan.checksum() == plan.checksum()
    path = tmp_path / "pruned.pt"
    torch.save({"state_dict": model.state_dict(), "plan": plan.to_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)

    fresh, _ = build(name, seed=123)  # different weights: everything must come from the checkpoint
    rebuilt_graph = apply_plan(fresh, checkpoint["plan"], x)
    assert rebuilt_graph.plan.checksum() == plan.checksum()
    fresh.load_state_dict(checkpoint["state_dict"])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    if name == "googlenet":
        model.train(), fresh.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = fresh(x)
        for u, v in zip(tensors(a), tensors(b)):
            assert torch.equal(u, v)


def test_groups_never_go_below_one_channel():
    model, x = build("flatten_cnn")
    graph = DependencyGraph(model, x)
    with pytest.raises(ValueError, match="at least 1 must remain"):
        graph.prune("conv1", range(8))
    graph.prune("conv1", range(7))  # down to a single channel is allowed
    assert graph.group("conv1").size == 1 and model.conv1.out_channels == 1 and model.conv2.in_channels == 1
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match="at least 1 must remain"):
        graph.prune("conv1", [0])
    assert model.conv1.out_channels == 1


# -- protect_outputs and ignore ------------------------------------------------------------------------------------
def test_protect_outputs_keeps_classifier_width():
    model, x = build("flatten_cnn")
    unprotected = DependencyGraph(copy.deepcopy(model), x, protect_outputs=False)
    assert "fc2" in [g.name for g in unprotected.groups]  # the guard below is not vacuous

    graph = DependencyGraph(model, x)
    assert all(m.module_name != "fc2" for g in graph.groups for m in g.members if m.kind == "out")
    prune_all(graph, 0.5)
    assert model.fc2.out_features == 5 and model(x).shape == (2, 5)

    resnet, rx = build("resnet18")
    graph = DependencyGraph(resnet, rx)
    assert all(m.module_name != "fc" for g in graph.groups for m in g.members if m.kind == "out")
    prune_all(graph, 0.5)
    assert resnet.fc.out_features == 10 and resnet.fc.in_features < 512


def test_ignore_excludes_groups_with_a_producer_inside():
    model, x = build("resnet18")
    full = DependencyGraph(copy.deepcopy(model), x)
    touching = {g.name for g in full.groups if any(p.module_name.startswith("layer1.") for p in g.producers)}
    assert {"conv1", "layer1.0.conv1", "layer1.1.conv1"} <= touching  # conv1 is tied to layer1's residual adds

    graph = DependencyGraph(model, x, ignore=["layer1"])
    names = {g.name for g in graph.groups}
    assert names == {g.name for g in full.groups} - touching
    assert not any(p.module_name.startswith("layer1.") for g in graph.groups for p in g.producers)
    prune_all(graph, 0.5)
    for module in model.layer1.modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels == 64 and module.in_channels == 64


def test_ignore_unknown_name_is_a_clear_error():
    model, x = build("resnet18")
    with pytest.raises(ValueError) as info:
        DependencyGraph(model, x, ignore=["nonexistent"])
    message = str(info.value)
    assert "ignore" in message and "'nonexistent'" in message and "named_modules" in message
    with pytest.raises(ValueError, match=r"ignore.*Did you mean 'layer1'"):
        DependencyGraph(model, x, ignore=["layr1"])


# -- optimizer transplant --------------------------------------------------------------------------------------------
def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    head = list(model.fc.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": body, "lr": 0.05}, {"params": head, "lr": 0.01}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=0.05)
    return torch.optim.AdamW(groups, lr=0.05, weight_decay=0.01)


def _train_step(model, optimizer, x, y) -> torch.Tensor:
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_transplant_optimizer_slices_state(kind):
    model, x = build("resnet18")
    model.train()
    y = torch.tensor([1, 7])
    optimizer = _optimizer(kind, model)
    for _ in range(2):
        _train_step(model, optimizer, x, y)
    old_params = list(model.parameters())
    old_state = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in optimizer.state[p].items()}
                 for p in old_params}
    old_conv = model.layer1[0].conv1.weight
    lrs = [g["lr"] for g in optimizer.param_groups]

    graph = DependencyGraph(model, x)
    result = prune_all(graph, 0.25)
    moved = transplant_optimizer(optimizer, result.replacements)
    assert moved == len(result.replacements) > 0

    # param_groups hold exactly the model's current parameters (identity), in the same groups.
    current = {id(p) for p in model.parameters()}
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in grouped} == current and len(grouped) == len(current)
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in model.fc.parameters()}
    assert [g["lr"] for g in optimizer.param_groups] == lrs
    assert all(p not in optimizer.state for p in result.replacements)

    for old, slicing in result.replacements.items():
        state = optimizer.state[slicing.new]
        for key in STATE_KEYS[kind]:
            expected = old_state[old][key]
            for dim, kept in slicing.steps:
                expected = expected.index_select(dim, kept)
            assert state[key].shape == slicing.new.shape
            assert torch.equal(state[key], expected), key
        if kind != "sgd":
            assert float(state["step"]) == float(old_state[old]["step"]) == 2.0

    # Independently, from the plan's original indices: layer1.0.conv1 reads conv1's group, writes its own.
    out_kept = torch.tensor(graph.plan.groups["layer1.0.conv1"].kept)
    in_kept = torch.tensor(graph.plan.groups["conv1"].kept)
    new_conv = model.layer1[0].conv1.weight
    assert result.replacements[old_conv].new is new_conv
    for key in STATE_KEYS[kind]:
        assert torch.equal(optimizer.state[new_conv][key], old_state[old_conv][key][out_kept][:, in_kept])
    assert torch.equal(new_conv.detach(), old_conv.detach()[out_kept][:, in_kept])

    # Training continues with the transplanted state: kept channels update, the loss stays finite.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "sgd":
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads_seen = {p: p.grad.clone() for p in model.parameters()}
        buffers = {p: optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
        optimizer.step()
        for p in model.parameters():  # momentum continues from the sliced buffer
            torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], 0.9 * buffers[p] + grads_seen[p])
        loss = nn.functional.cross_entropy(model(x), y)
    else:
        loss = _train_step(model, optimizer, x, y)
        assert all(float(optimizer.state[p]["step"]) == 3.0 for p in model.parameters())
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "layer1.0.conv1.weight" in changed and "fc.weight" in changed


@pytest.mark.parametrize("scheduler", ["step", "cosine"])
def test_lr_scheduler_unaffected_by_transplant(scheduler):
    def make(model):
        optimizer = _optimizer("sgd", model)
        if scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
        return optimizer, sched

    model, x = build("flatten_cnn")
    model.fc = model.fc2  # _optimizer puts `model.fc` in its own param group
    twin = copy.deepcopy(model)
    y = torch.tensor([0, 3])
    runs = []
    for net, prune in ((model, True), (twin, False)):
        net.train()
        optimizer, sched = make(net)
        lrs = []
        for epoch in range(6):
            if prune and epoch == 2:
                graph = DependencyGraph(net, x)
                transplant_optimizer(optimizer, graph.prune_groups({"conv1": [0, 2], "conv2": [1]}).replacements)
            _train_step(net, optimizer, x, y)
            sched.step()
            lrs.append([g["lr"] for g in optimizer.param_groups])
        runs.append(lrs)
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][-1]  # the schedule actually moved
    assert model.conv1.out_channels == 6 and twin.conv1.out_channels == 8


# -- bad input: clear errors, model untouched ------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_and_graph():
    model, x = build("resnet18")
    return model, x, DependencyGraph(model, x)


@pytest.mark.parametrize(
    "removals, error, pattern",
    [
        ({"layer1.0.conv1": [3, 64]}, ValueError,
         r"indices for group 'layer1.0.conv1' out of range: \[64\].*\[0, 64\)"),
        ({"layer1.0.conv1": [-1]}, ValueError, r"out of range.*\[0, 64\)"),
        ({"layer1.0.conv1": [5, 5]}, ValueError, "indices for group 'layer1.0.conv1' contains duplicates"),
        ({"layer1.0.conv1": list(range(64))}, ValueError, "remove 64 of 64 channels.*at least 1 must remain"),
        ({"layer1.0.conv1": ["a"]}, ValueError, r"must be integers in \[0, 64\)"),
        # a valid removal next to an invalid one: nothing is removed at all
        ({"layer2.0.conv1": [0, 1], "layer1.0.conv1": [99]}, ValueError, "out of range"),
        ({"layer1.0.conv": [0]}, ValueError, r"removals: group 'layer1.0.conv' is not a prunable group.*Did you mean.*'layer1.0.conv1'"),
    ],
)
def test_bad_indices_raise_and_leave_model_untouched(resnet_and_graph, removals, error, pattern):
    model, x, graph = resnet_and_graph
    before = model_fingerprint(model)
    plan_before = graph.plan.to_dict()
    with pytest.raises(error, match=pattern):
        graph.prune_groups(removals)
    assert_unchanged(model, before)
    assert graph.plan.to_dict() == plan_before
    assert graph.group("layer1.0.conv1").size == 64


def test_grouped_conv_needs_symmetric_indices():
    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = DependencyGraph(model, x)
    group = next(g for g in graph.groups if g.divisions > 1)
    chunk = group.size // group.divisions
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match=rf"grouped convolution with {group.divisions} groups.*expand_positions"):
        graph.prune(group, [0])
    assert_unchanged(model, before)
    graph.prune(group, group.expand_positions([0]))  # the symmetric version works
    assert graph.group(group.name).size == group.size - group.divisions
    assert graph.group(group.name).size // graph.group(group.name).divisions == chunk - 1
    assert model(x).shape == (2, 10)


class TrainOnlyFailure(nn.Module):
    """Runs in eval mode, but its train-mode forward, which runs an auxiliary head (so the graph needs a train-mode
    trace), cannot be traced (a data-dependent Python branch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.aux = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.training and bool((self.aux(y).abs().sum() > 0).item()):
            raise RuntimeError("training branch is not supported")
        return self.head(y)


class AlwaysFails(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        raise RuntimeError("this forward is broken")


def test_untraceable_models_raise_unsupported_and_stay_untouched():
    x = torch.randn(2, 3, 8, 8)
    model = TrainOnlyFailure().train()
    before = model_fingerprint(model)
    with pytest.raises(UnsupportedModelError, match="could not trace TrainOnlyFailure.*training branch"):
        DependencyGraph(model, x)
    assert_unchanged(model, before)
    assert DependencyGraph(model, x, trace_mode="eval").groups  # eval-mode tracing is the documented way out
    assert_unchanged(model, before)

    broken = AlwaysFails()
    with pytest.raises(UnsupportedModelError, match="example_inputs.*this forward is broken"):
        DependencyGraph(broken, x)


def test_example_inputs_that_do_not_fit():
    model, _ = build("resnet18")
    before = model_fingerprint(model)
    with pytest.raises(UnsupportedModelError, match="example_inputs.*channels"):
        DependencyGraph(model, torch.randn(2, 5, 32, 32))
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        DependencyGraph(model, (torch.randn(2, 3, 32, 32), torch.randn(2, 3)))  # one argument too many
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="trace_mode='training' is not supported; accepted values: 'train', 'eval'"):
        DependencyGraph(model, torch.randn(2, 3, 32, 32), trace_mode="training")


# -- a surgery that fails midway is rolled back ------------------------------------------------------------------
class ChannelScale(nn.Module):
    """A user layer with one learnable scale per channel, pruned through a user-supplied Torch-Pruning pruner."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        self.scale = nn.Parameter(torch.rand(num_channels) + 0.5)

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class BrokenScalePruner(tp.pruner.BasePruningFunc):
    """Slices the layer's parameter and width, then fails: a half-modified layer, as a real bug would leave."""

    def prune_out_channels(self, layer, idxs):
        keep = [i for i in range(layer.num_channels) if i not in set(idxs)]
        layer.scale = nn.Parameter(layer.scale.data[keep])
        layer.num_channels = len(keep)
        layer.pruned_by = "broken"
        raise RuntimeError("broken pruner gave up halfway")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return layer.num_channels

    get_in_channels = get_out_channels


class ScaledCNN(FlattenCNN):
    def __init__(self):
        super().__init__()
        self.scale = ChannelScale(8)

    def forward(self, x):
        x = self.scale(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_failed_surgery_is_rolled_back():
    torch.manual_seed(0)
    model = ScaledCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    graph = DependencyGraph(model, x, customized_pruners={ChannelScale: BrokenScalePruner()})
    assert "scale" in graph.group("conv1").module_names
    before = model_fingerprint(model)
    parameters = list(model.parameters())

    with pytest.raises(PruningError, match="restored.*broken pruner gave up halfway") as info:
        graph.prune_groups({"conv2": [0], "conv1": [1, 3]})  # conv2 and conv1 are sliced before the failure
    assert isinstance(info.value.__cause__, RuntimeError)

    assert_unchanged(model, before)
    assert not hasattr(model.scale, "pruned_by")
    assert all(a is b for a, b in zip(model.parameters(), parameters))  # the same Parameter objects
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    model.train()
    model(x).sum().backward()
    assert graph.plan.is_empty() and graph.group("conv1").size == 8 and graph.group("conv2").size == 6
    # The graph is still usable for groups the broken layer does not belong to.
    graph.prune("conv2", [0])
    assert model.conv2.out_channels == 5 and model.fc1.in_features == 5 * 16


def test_tentative_surgery_is_put_back_exactly_even_when_interrupted():
    """``graph.tentatively(removals)`` yields the really pruned model (a latency step is measured on it) and then
    restores the model (same Parameter objects, values, shapes, modes), Torch-Pruning's op records, the plan and
    the groups, also when the body raises (KeyboardInterrupt included); afterwards the graph prunes as before."""
    model, x = build("resnet18")
    graph = DependencyGraph(model, x)
    before, parameters = model_fingerprint(model), list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    removals = {"layer1.0.conv1": [0, 5, 9], "layer3.0.conv1": list(range(10))}
    with torch.no_grad():
        expected = model(x)
    with graph.tentatively(removals) as pruned:
        assert pruned is model
        assert model.layer1[0].conv1.out_channels == 61 and model.layer3[0].conv1.out_channels == 246
        assert graph.group("layer3.0.conv1").size == 246 and not graph.plan.is_empty()
        model(x)
    assert_unchanged(model, before)
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert optimizer.param_groups[0]["params"] == parameters  # nothing outside the graph saw the tentative model
    assert graph.plan.is_empty() and graph.group("layer3.0.conv1").size == 256
    with pytest.raises(KeyboardInterrupt):
        with graph.tentatively(removals):
            raise KeyboardInterrupt
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    graph.prune_groups(removals)  # the graph still fits the model
    assert model.layer3[0].conv1.out_channels == 246 and graph.group("layer3.0.conv1").size == 246
    model(x)


# -- bounded graph building ------------------------------------------------------------------------------------
class SlowForward(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:  # Python-level busy loop, like a slow tracer
            pass
        return self.head(self.conv(x))


def test_graph_build_timeout_is_fast_and_harmless():
    model = SlowForward(seconds=30.0)
    x = torch.randn(2, 3, 8, 8)
    before = model_fingerprint(model)
    start = time.monotonic()
    with pytest.raises(GraphBuildTimeout, match="SlowForward took longer than 0.5 s"):
        DependencyGraph(model, x, build_timeout=0.5)
    assert time.monotonic() - start < 10
    assert_unchanged(model, before)
    model.seconds = 0.0
    graph = DependencyGraph(model, x, build_timeout=5)
    graph.prune("conv", [0])
    assert model(x).shape == (2, 2, 6, 6)


# -- FLOPs ---------------------------------------------------------------------------------------------------------
def test_count_flops_restores_modes_and_buffers():
    model, x = build("resnet18")
    model.train()
    model.layer2.eval()
    model.layer3[0].bn1.momentum = 1.0  # any forward in train mode would overwrite its statistics
    before = model_fingerprint(model)
    rng = torch.get_rng_state()
    flops = count_flops(model, x)
    assert flops == count_flops(model, x[:1]) > 0  # one sample, whatever the batch
    assert_unchanged(model, before)
    assert model.training and not model.layer2.training and model.layer3.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_flops_model_predicts_real_pruning():
    model, x = build("resnet18")
    graph = DependencyGraph(model, x)
    estimator = FlopsModel(graph, x)
    before = count_flops(model, x)
    assert estimator.predict({}) == pytest.approx(before, rel=1e-9)
    l2 = criteria.get("l2")
    removals = {}
    for i, group in enumerate(graph.groups):
        n = int(group.size * (0.2 + 0.05 * (i % 5)))
        removals[group.name] = group.lowest(l2.score(group), n)
    graph.prune_groups(removals)
    after = count_flops(model, x)
    assert after < 0.8 * before
    assert estimator.predict(graph.widths()) == pytest.approx(after, rel=0.005)
