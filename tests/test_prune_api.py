"""The one-shot functional API: lightning_prune.prune."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune as lp
from lightning_prune.models import create_model



def resnet20():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10).eval()


def test_prune_uniform_report_and_plan_round_trip():
    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    report = lp.prune(model, x, criterion="l2", amount=0.5, allocation="uniform")
    assert report.flops_after < 0.5 * report.flops_before
    assert report.params_after < report.params_before
    assert report.channel_sparsity == pytest.approx(0.5, abs=0.02)
    for name, width in report.widths_after.items():
        assert width == pytest.approx(report.widths_before[name] / 2, abs=1)
    assert report.flops_after == lp.count_flops(model, x)
    assert "FLOPs" in report.summary()

    fresh = resnet20()
    lp.apply_plan(fresh, report.plan, x)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))


def test_prune_global_and_flops_target():
    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    report = lp.prune(model, x, criterion="l1", flops_reduction=0.4, allocation="global", amount=None)
    assert report.target_met
    assert report.flops_reduction >= 0.4 - 1e-3
    widths = report.widths_after
    assert len(set(w / report.original_widths[n] for n, w in widths.items())) > 1  # not uniform


def test_prune_scope_alias_and_data_driven_criterion():
    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    report = lp.prune(model, x, criterion="taylor", amount=0.3, scope="layerwise",
                      dataloader=DataLoader(data, batch_size=8), scoring_batches=2)
    assert report.channel_sparsity == pytest.approx(0.3, abs=0.03)


def test_prune_sensitivity_needs_and_uses_validation_data():
    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    with pytest.raises(ValueError, match="val_dataloader"):
        lp.prune(copy.deepcopy(model), x, amount=0.2, allocation="sensitivity")
    report = lp.prune(model, x, criterion="l2", amount=None, flops_reduction=0.2, allocation="sensitivity",
                      val_dataloader=DataLoader(data, batch_size=8),
                      sensitivity={"progress": False, "num_groups": 3})
    assert report.target_met and report.flops_reduction >= 0.2 - 1e-3
    # every round is reported: trial accuracies of the eligible groups, the chosen ones and what they lost
    steps = report.sensitivity_steps
    assert steps and len(steps) == len(report.plan["events"])
    for step in steps:
        assert set(step["chosen"]) <= set(step["trials"]) and len(step["chosen"]) <= 3
        assert all(0.0 <= trial["accuracy"] <= 1.0 for trial in step["trials"].values())
    assert sum(n for step in steps for n in step["removed"].values()) == sum(report.removed.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(amount=1.0), "amount"),
        (dict(amount=-0.1), "amount"),
        (dict(criterion="nope"), "criterion"),
        (dict(allocation="everywhere"), "allocation"),
        (dict(ignore=["layer9"]), "ignore"),
        (dict(criterion="taylor"), "dataloader"),
        (dict(round_to=0), "round_to"),
        (dict(amount=None, flops_reduction=1.5), "flops_reduction"),
        (dict(amount=0.3, flops_reduction=0.5), "exactly one of amount"),
        (dict(allocation="sensitivity", sensitivity={"num_group": 2}), r"sensitivity: unknown option"),
        (dict(recalibrate_batches=-1), "recalibrate_batches"),
    ],
)
def test_bad_input_leaves_model_untouched(kwargs, match):
    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        lp.prune(model, x, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_untraceable_model_is_a_clear_error():
    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            raise RuntimeError("this model only runs on a special input")

    with pytest.raises(lp.UnsupportedModelError, match="example_inputs"):
        lp.prune(Untraceable(), torch.randn(1, 3, 8, 8), amount=0.5)


class FixedWidthReshape(torch.nn.Module):
    """Like torchvision's ViT, ``forward`` reshapes with a width stored in an attribute, so removing ``stem``'s
    channels breaks the model although Torch-Pruning maps the group; ``body`` is prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.width = 8
        self.body = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, _, h, w = x.shape
        x = x.reshape(n, self.width, h * w).reshape(n, self.width, h, w)
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_groups_that_break_the_model_are_found_and_left_unpruned():
    torch.manual_seed(0)
    model, x = FixedWidthReshape().eval(), torch.randn(2, 3, 8, 8)
    graph = lp.DependencyGraph(model, x)
    assert {g.name for g in graph.groups} == {"stem", "body"}
    before = copy.deepcopy(model.state_dict())
    broken = graph.find_unprunable()
    assert set(broken) == {"stem"} and "invalid for input" in broken["stem"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # probing works on a copy

    with pytest.warns(UserWarning, match="stem: .*cannot be pruned|cannot be pruned.*stem"):
        report = lp.prune(model, x, criterion="l1", amount=0.5)
    assert model.stem.out_channels == 8 and model.body.out_channels == 8
    assert report.widths_after == {"body": 8}
    model.train()(x).sum().backward()


def test_a_target_missed_because_of_round_to_says_so():
    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"target 30.0% was reached only to .*rounded to multiples of round_to=8"):
        report = lp.prune(model, x, criterion="l2", amount=0.3, round_to=8)
    assert not report.target_met
    assert all(width % 8 == 0 for width in report.widths_after.values())


def test_a_missed_target_with_table_read_steps_names_round_to_auto():
    from lightning_prune.structure import DependencyGraph
    from lightning_prune.target_report import assess_target

    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    graph = DependencyGraph(model, x)
    met, reached, why = assess_target(graph, 0.3, "channels", flops_after=1.0, original_flops=1.0,
                                      max_group_sparsity=0.9, round_to="auto")
    assert not met and reached == 0.0
    assert "block sizes the latency table measured (round_to='auto'" in why and "round_to=8" not in why
