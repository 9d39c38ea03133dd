"""Latency targets (issue 13): measurement semantics, the latency lookup table (cache, prediction), allocation to a
latency budget (caps respected), the one-of-three target arguments, and a callback fit with resume. Timings are
only sanity-checked (generous bounds): speed targets live in benchmarks/latency_target.py."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lightning_prune import prune
from lightning_prune.allocation.latency import plan_widths, resolve_target
from lightning_prune.callbacks import PruneCallback
from lightning_prune.criteria.scoring import score_groups
from lightning_prune import criteria
from lightning_prune.structure import DependencyGraph
from lightning_prune.structure.latency import LatencyModel, measure_latency, measure_ratio


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


BATCH = torch.randn(16, 3, 32, 32)


# -- measurement ------------------------------------------------------------------------------------------------
def test_measure_latency_restores_modes_and_runs_without_grad():
    model = small_cnn().train()
    model[1].eval()  # a mixed state must come back as it was
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append((torch.is_inference_mode_enabled(), m.training)))
    running = model[4].running_mean.clone()
    ms = measure_latency(model, BATCH, warmup=2, rounds=3)
    assert 0 < ms < 10_000
    assert len(calls) == 5 and all(inference and not training for inference, training in calls)
    assert model.training and not model[1].training and model[4].training
    assert torch.equal(model[4].running_mean, running)  # eval mode: statistics untouched


def test_measure_ratio_of_a_model_against_itself_is_near_one():
    model = small_cnn()
    a, b = measure_ratio(model, copy.deepcopy(model), BATCH, rounds=10)
    assert 0.5 < b / a < 2.0  # the same network: only noise separates them


# -- the table --------------------------------------------------------------------------------------------------
def test_table_covers_layers_is_cached_and_round_trips(tmp_path):
    model = small_cnn().eval()
    graph = DependencyGraph(model, BATCH[:2])
    table = LatencyModel.build(graph, BATCH, cache_dir=tmp_path)
    assert not table.cached and table.timings > 0
    kinds = {e["kind"] for e in table.entries.values()}
    assert {"Conv2d", "BatchNorm2d", "ReLU", "Linear"} <= kinds
    conv = next(e for name, e in table.entries.items() if name == "3")  # reads group "0", writes group "3"
    assert conv["in_group"] and conv["out_group"] and len(conv["in_points"]) > 1 and len(conv["out_points"]) > 1
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == table.key
    again = LatencyModel.build(graph, BATCH, cache_dir=tmp_path)
    assert again.cached and again.digest() == table.digest()
    assert LatencyModel.from_dict(table.to_dict()).predict(graph.widths()) == pytest.approx(table.dense_ms)
    # Another input shape is another key (a miss).
    other = LatencyModel.build(graph, BATCH[:4], cache_dir=tmp_path)
    assert not other.cached and other.key != table.key and len(list(tmp_path.glob("*.json"))) == 2


def test_prediction_tracks_measured_latency_of_pruned_models(tmp_path):
    """Loose, machine-independent: at half and quarter widths the table predicts a clearly smaller latency, in
    the right order, within a factor of 2.5 of the measured ratio."""
    model = small_cnn().eval()
    x = torch.randn(32, 3, 32, 32)
    graph = DependencyGraph(model, x[:2])
    table = LatencyModel.build(graph, x, cache_dir=tmp_path)
    predicted, measured = [], []
    for fraction in (0.5, 0.25):
        pruned = copy.deepcopy(model)
        prune(pruned, x[:2], amount=1 - fraction, max_group_sparsity=0.95)
        widths = DependencyGraph(pruned, x[:2]).widths()
        predicted.append(table.predict(widths) / table.dense_ms)
        dense_ms, pruned_ms = measure_ratio(model, pruned, x, rounds=15)
        measured.append(pruned_ms / dense_ms)
    assert predicted[0] > predicted[1] and all(p < 0.95 for p in predicted)
    for p, m in zip(predicted, measured):
        assert 0.4 < p / m < 2.5, (predicted, measured)  # generous: CI machines are shared and noisy


# -- allocation -------------------------------------------------------------------------------------------------
def test_greedy_respects_max_group_sparsity_and_round_to(tmp_path):
    model = small_cnn().eval()
    graph = DependencyGraph(model, BATCH[:2])
    table = LatencyModel.build(graph, BATCH, cache_dir=tmp_path)
    scores = score_groups(model, graph.groups, criteria.get("l2"))
    for round_to, sparsity in ((None, 0.5), (8, 0.7), ("auto", 0.9)):
        widths = plan_widths(graph, scores, table, 0.0, round_to=round_to, max_group_sparsity=sparsity,
                             device=torch.device("cpu"), dtype=None)  # an unreachable budget: all the way down
        for group in graph.groups:
            width = widths[group.name]
            assert width >= group.original_size * (1 - sparsity) - 1e-9, (group.name, width)
            if width < group.size and round_to is not None:
                assert width % 8 == 0, (round_to, group.name, width)
        assert table.predict(widths) < table.dense_ms


def test_prune_to_a_latency_target_reports_measured_and_predicted(tmp_path):
    model = small_cnn()
    report = prune(model, BATCH[:2], latency_reduction=0.4, latency_input=BATCH, latency_cache=str(tmp_path),
                   round_to="auto")
    assert report.target_kind == "latency" and report.latency_after_ms > 0 and report.predicted_latency_ms > 0
    assert report.latency_after_ms < report.latency_before_ms  # sanity, generous: the model got much narrower
    assert report.flops_after < report.flops_before
    assert report.latency_error is not None and abs(report.latency_error) < 1.0
    assert report.to_dict()["latency_reduction"] == pytest.approx(1 - report.latency_ratio)
    assert "Latency" in report.summary()
    for name, width in report.widths_after.items():
        if width < report.widths_before[name]:
            assert width % 8 == 0  # auto: oneDNN-friendly steps on CPU
    model(BATCH)  # still runs


# -- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(amount=0.3, latency_reduction=0.3),
                                    dict(flops_reduction=0.3, latency_reduction=0.3),
                                    dict(amount=0.2, flops_reduction=0.3)])
def test_exactly_one_target(kwargs):
    with pytest.raises(ValueError, match="exactly one of amount .* flops_reduction .* latency_reduction"):
        prune(small_cnn(), BATCH[:2], **kwargs)
    with pytest.raises(ValueError, match="exactly one of amount"):
        PruneCallback(**kwargs)
    with pytest.raises(ValueError, match="exactly one of amount"):
        PruneCallback()


def test_latency_argument_values_are_checked_before_touching_the_model():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="latency_reduction"):
        prune(model, BATCH[:2], latency_reduction=1.0)
    with pytest.raises(ValueError, match="latency_dtype"):
        prune(model, BATCH[:2], latency_reduction=0.3, latency_dtype="int3")
    with pytest.raises(ValueError, match="round_to='auto'"):
        prune(model, BATCH[:2], amount=0.3, round_to="auto")
    with pytest.raises(ValueError, match="allocation='sensitivity'"):
        PruneCallback(latency_reduction=0.3, allocation="sensitivity")
    with pytest.raises(ValueError, match="latency_input"):
        PruneCallback(amount=0.3, latency_input=BATCH)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert resolve_target(None, None, 0.25) == (0.25, "latency")


# -- the callback -----------------------------------------------------------------------------------------------
def _trainer(tmp_path, callbacks, max_epochs, **kwargs):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      limit_train_batches=3, limit_val_batches=1, **kwargs)


def test_callback_prunes_to_latency_target_logs_and_resumes(tmp_path):
    import pytorch_lightning as pl

    from tests.lightning_modules import IMAGE, digits, fit_data, module_class

    pl.seed_everything(0)
    dm = digits(batch_size=32)
    latency_input = torch.zeros(32, 1, IMAGE, IMAGE)
    callback = PruneCallback(latency_reduction=0.4, schedule="iterative", start_epoch=1, end_epoch=2, steps=2,
                             latency_input=latency_input, latency_cache=str(tmp_path / "cache"), verbose=False)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    module = module_class(pl)()
    trainer = _trainer(tmp_path, [callback, checkpoint], max_epochs=3, max_steps=6)  # stops after epoch 1
    trainer.fit(module, **fit_data(pl, dm))
    assert callback.done_epochs == [1] and callback.latency_table is not None
    first = callback.reports[-1]
    assert first["target_kind"] == "latency" and first["latency_after_ms"] > 0
    assert first["latency_ratio"] < 1.0 and first["predicted_latency_ms"] > 0
    metrics = trainer.callback_metrics
    assert "prune/latency_ms" in metrics and "prune/latency_reduction" in metrics and "prune/latency_error" in metrics
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if "PruneCallback" in k)
    assert saved["latency_table"]["key"] == callback.latency_table["key"]
    assert saved["latency_ratio"] == pytest.approx(callback.latency_ratio)

    # Resume: the table comes from the checkpoint (no rebuild: the cache directory is gone).
    import shutil

    shutil.rmtree(tmp_path / "cache")
    resumed = PruneCallback(latency_reduction=0.4, schedule="iterative", start_epoch=1, end_epoch=2, steps=2,
                            latency_input=latency_input, latency_cache=str(tmp_path / "cache"), verbose=False)
    trainer = _trainer(tmp_path, [resumed], max_epochs=3)
    trainer.fit(module_class(pl)(), **fit_data(pl, dm), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.done_epochs == [1, 2]
    assert not (tmp_path / "cache").exists()  # the table was the checkpoint's
    assert resumed.latency_table["key"] == callback.latency_table["key"]
    assert resumed.reports[-1]["latency_ratio"] <= first["latency_ratio"] + 0.2  # the ramp goes on (noise aside)


def test_bad_latency_input_fails_before_training(tmp_path):
    import pytorch_lightning as pl

    from tests.lightning_modules import digits, fit_data, module_class
    from tests.test_preflight import counter

    count = counter(pl)
    callback = PruneCallback(latency_reduction=0.3, epochs=[1], latency_input=torch.zeros(4, 3, 7, 7),
                             latency_cache=str(tmp_path), verbose=False)
    trainer = _trainer(tmp_path, [callback, count], max_epochs=2)
    with pytest.raises(ValueError, match="latency_input: the forward"):
        trainer.fit(module_class(pl)(), **fit_data(pl, digits(batch_size=32)))
    assert count.batches == 0


# -- DDP --------------------------------------------------------------------------------------------------------
def test_ddp_ranks_decide_the_same_on_rank_zeros_table(tmp_path):
    """Two CPU ranks (gloo): rank zero builds the table and measures, every rank prunes identically (the removals
    digest check inside the callback passes) and holds rank zero's table."""
    from tests.test_ddp import assert_identical_ranks, load_ranks, run

    out = tmp_path / "run"
    result = run(out, "--strategy", "ddp", "--criterion", "l2", "--latency")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = load_ranks(out)
    assert_identical_ranks(ranks)
    zero, one = ranks
    assert zero["latency_table"] is not None and zero["latency_table"] == one["latency_table"]
    assert [r["latency_ratio"] for r in zero["reports"]] == [r["latency_ratio"] for r in one["reports"]]
    assert zero["reports"][0]["latency_ratio"] < 1.0
    assert len(list((out / "latency-cache").glob("*.json"))) == 1  # built once, by rank zero


# -- CLI --------------------------------------------------------------------------------------------------------
def test_cli_fit_with_latency_reduction_prints_measured_latency(tmp_path, capsys, monkeypatch):
    from lightning_prune.cli import main
    from tests.test_cli import QUICKSTART

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    code = main([
        "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "2", "--trainer.callbacks.epochs", "[1]",
        "--trainer.callbacks.amount", "null", "--trainer.callbacks.latency_reduction", "0.3",
        "--trainer.callbacks.latency_cache", str(tmp_path / "cache"), "--trainer.callbacks.round_to", "auto",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.limit_train_batches", "3",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--test_after_fit", "false",
    ])
    torch.set_num_threads(threads)
    output = capsys.readouterr().out
    assert code == 0
    line = next(line for line in output.splitlines() if line.startswith("latency (ms)"))
    assert "removed, measured" in line
