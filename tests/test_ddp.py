"""Two-process DDP on CPU (gloo): identical pruning on every rank. Each run is a subprocess with a timeout, so
a hang fails the test instead of stalling CI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"
TIMEOUT_S = 240


def run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    try:
        return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True,
                              text=True, timeout=TIMEOUT_S, env=env, cwd=str(out.parent))
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"DDP run did not finish within {TIMEOUT_S} s (hang?)\n{error.stdout}\n{error.stderr}")


def load_ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_identical_ranks(ranks: list[dict]) -> None:
    zero, one = ranks
    assert zero["world_size"] == 2
    assert zero["plan"] == one["plan"]
    assert zero["done"] == one["done"] == [1, 2]
    assert zero["state"].keys() == one["state"].keys()
    for key in zero["state"]:
        assert zero["state"][key].shape == one["state"][key].shape, key
        assert torch.equal(zero["state"][key], one["state"][key]), key


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_prunes_identically_with_data_driven_criterion(tmp_path, strategy):
    out = tmp_path / "run"
    result = run(out, "--strategy", strategy, "--criterion", "sd")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = load_ranks(out)
    assert_identical_ranks(ranks)
    first_conv = ranks[0]["state"]["model.features.0.weight"]
    assert first_conv.shape[0] < 16  # really pruned

    # All-reduced statistics equal those of one process over the union of both shards.
    reduced = torch.load(out / "reduced_state.pt", weights_only=True)
    union = torch.load(out / "union_state.pt", weights_only=True)
    assert reduced.keys() == union.keys() and reduced
    for key in union:
        torch.testing.assert_close(reduced[key], union[key], rtol=1e-6, atol=1e-6, msg=key)


def test_ddp_spawn_under_lightning_pytorch_finishes_like_pytorch_lightning(tmp_path):
    """The unified package's ddp_spawn launcher is recognised too: the fit warns that the pruned weights stay in
    the workers (checkpoints hold them) and finishes, instead of failing the copy-back with a size mismatch."""
    out = tmp_path / "run"
    result = run(out, "--strategy", "ddp_spawn", "--criterion", "l1", "--namespace", "lightning.pytorch")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "size mismatch" not in result.stderr
    assert "pruned weights are not copied back" in result.stdout + result.stderr
    ranks = load_ranks(out)
    assert_identical_ranks(ranks)
    assert ranks[0]["state"]["model.features.0.weight"].shape[0] < 16


def test_ddp_sensitivity_with_batchnorm_reestimation_agrees_across_ranks(tmp_path):
    """Each rank re-estimates BatchNorm statistics on its own scoring shard; they are averaged over the ranks, so
    every trial measures the same network everywhere and the ranks choose the same groups."""
    out = tmp_path / "run"
    result = run(out, "--criterion", "l1", "--sensitivity-bn")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert_identical_ranks(load_ranks(out))


def _without_images(reports: list[dict]) -> list[dict]:
    per_rank = ("images", "forward_equivalents")  # each rank's own share of the work
    return [{**r, "sensitivity_steps": [{k: v for k, v in step.items() if k not in per_rank}
                                        for step in r["sensitivity_steps"]]} for r in reports]


@pytest.fixture(scope="module")
def default_sensitivity_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_sensitivity") / "run"
    result = run(out, "--criterion", "l1", "--sensitivity-default", "--val-batches", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return load_ranks(out)


def test_ddp_sensitivity_with_default_options_decides_identically_and_shares_the_trials(default_sensitivity_ranks):
    """Default sensitivity options, a FLOPs target and no validation loop between epochs, so the ranks' BatchNorm
    buffers have diverged at the event (DDP keeps them per rank). Before, each rank measured its own network and
    the fit died with InconsistentRanksError; now every trial sees rank zero's buffers, the trials are split over
    the ranks and every rank decides on the same gathered numbers."""
    zero, one = default_sensitivity_ranks
    assert zero["plan"] == one["plan"] and zero["done"] == one["done"] == [1, 2]
    assert {k: v.shape for k, v in zero["state"].items()} == {k: v.shape for k, v in one["state"].items()}
    assert _without_images(zero["reports"]) == _without_images(one["reports"])  # identical trial accuracies
    steps = list(zip(zero["reports"][0]["sensitivity_steps"], one["reports"][0]["sensitivity_steps"]))
    assert steps and zero["reports"][-1]["target_met"]
    for mine, theirs in steps:
        everything = (len(mine["trials"]) + 1) * zero["val_images"]  # the trials and the baseline, unsplit
        assert 0 < mine["images"] < everything and 0 < theirs["images"] < everything
        # each rank runs its share of the trials after its own unmasked pass (which their prefixes replay)
        assert mine["images"] + theirs["images"] <= everything + zero["val_images"]
        assert mine["forward_equivalents"] < mine["images"] and theirs["forward_equivalents"] < theirs["images"]


def test_ddp_sensitivity_sharding_the_split_decides_like_sharding_the_trials(tmp_path, default_sensitivity_ranks):
    """``shard="data"``: every rank runs every (prefix-replayed) trial on its half of the split and the correct
    counts are summed, so the numbers, and the plan, are those of ``shard="groups"``."""
    out = tmp_path / "run"
    result = run(out, "--criterion", "l1", "--sensitivity-default", "--val-batches", "0",
                 "--sensitivity-options", '{"shard": "data", "progress": false}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    zero, one = load_ranks(out)
    assert zero["plan"] == one["plan"] == default_sensitivity_ranks[0]["plan"]
    assert _without_images(zero["reports"]) == _without_images(one["reports"])
    accuracies = lambda ranks: [{n: t["accuracy"] for n, t in step["trials"].items() if t.get("exact", True)}
                                for step in ranks["reports"][0]["sensitivity_steps"]]
    split, dealt = accuracies(zero), accuracies(default_sensitivity_ranks[0])
    assert [{n: a for n, a in s.items() if n in d} for s, d in zip(split, dealt)] == dealt  # same measured numbers
    for mine, theirs in zip(zero["reports"][0]["sensitivity_steps"], one["reports"][0]["sensitivity_steps"]):
        # a share of the split each: the unmasked pass and every trial on it
        assert 0 < mine["images"] < theirs["images"] + mine["images"] == (len(mine["trials"]) + 1) * zero["val_images"]


def test_ddp_fast_sensitivity_mode_decides_identically_on_both_ranks(tmp_path):
    """``mode="fast"`` under DDP: a lazy round's chunks (the first one sized by the estimates and the margin) are
    taken from numbers every rank shares, so both ranks measure the same groups, in the same collective calls,
    and decide the same; the lazy rounds measure fewer trials than the full refreshes."""
    out = tmp_path / "run"
    result = run(out, "--criterion", "l1", "--sensitivity-default", "--val-batches", "0", "--sensitivity-options",
                 '{"mode": "fast", "top_k": 1, "refresh_every": 3, "shard": "data", "progress": false}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    zero, one = load_ranks(out)
    assert zero["plan"] == one["plan"] and zero["done"] == one["done"] == [1, 2]
    assert _without_images(zero["reports"]) == _without_images(one["reports"])
    trials = [len(step["trials"]) for step in zero["reports"][0]["sensitivity_steps"]]
    assert len(trials) >= 3 and all(1 <= n < trials[0] for n in trials[1:3]), trials  # rounds 1, 2 are lazy


def test_ddp_blend_search_is_shared_and_agrees_across_ranks(tmp_path):
    """Blend's evolutionary search deals its population over the ranks, each measured with rank zero's
    BatchNorm buffers (diverged here: no validation loop), and gathers the fitnesses."""
    out = tmp_path / "run"
    result = run(out, "--criterion", "blend", "--val-batches", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    zero, one = load_ranks(out)
    assert zero["plan"] == one["plan"] and zero["done"] == one["done"] == [1, 2]
    assert {k: v.shape for k, v in zero["state"].items()} == {k: v.shape for k, v in one["state"].items()}


def test_ddp_resume_mid_schedule(tmp_path):
    first = run(tmp_path / "first", "--criterion", "taylor", "--stop-after", "1")
    assert first.returncode == 0, first.stderr[-5000:]
    checkpoint = tmp_path / "first" / "mid.ckpt"
    assert checkpoint.exists()
    resumed = run(tmp_path / "resumed", "--criterion", "taylor", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert_identical_ranks(load_ranks(tmp_path / "resumed"))


def test_sync_batchnorm_models_are_pruned_like_batchnorm():
    """SyncBatchNorm (what `Trainer(sync_batchnorm=True)` converts to) is coupled and pruned like BatchNorm.
    torch only runs SyncBatchNorm under DDP on GPU modules, so the multi-process run needs a GPU; the structure
    is checked here."""
    import copy

    import torchvision
    from torch import nn

    from lightning_prune.structure import DependencyGraph

    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model)
    graph = DependencyGraph(model, x)
    group = graph.group("layer1.0.conv1")
    graph.prune(group, [0, 1, 2])
    assert isinstance(model.layer1[0].bn1, nn.SyncBatchNorm) and model.layer1[0].bn1.num_features == 61
    with torch.no_grad():
        reference.layer1[0].conv2.weight[:, :3] = 0.0
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


def test_inconsistent_ranks_are_detected(tmp_path):
    result = run(tmp_path / "bad", "--inconsistent")
    assert result.returncode != 0
    assert "Ranks chose different channels to remove" in result.stdout + result.stderr
