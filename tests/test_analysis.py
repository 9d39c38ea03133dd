"""Criteria analysis (paper 1): similarity, applicability, CWDA, the report, the CLI and the callback."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_prune.analysis import AnalysisReport, analyze, applicability, rank_similarity, topk_jaccard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gaussian_filters(n: int, c_in: int, sigma: float, seed: int) -> torch.Tensor:
    return sigma * torch.randn(n, c_in, 3, 3, generator=torch.Generator().manual_seed(seed))


def _heavy_tailed_filters(n: int, c_in: int, seed: int) -> torch.Tensor:
    """Filters that break CWDA: log-normal norms (heavy-tailed) and two kinds of filters, dense and spiky
    (3 non-zero weights). Equal L2 norms then mean very different L1 norms, so L1 and L2 disagree."""
    g = torch.Generator().manual_seed(seed)
    d = c_in * 9
    norms = 0.05 * torch.exp(0.7 * torch.randn(n, 1, generator=g))
    z = torch.randn(n, d, generator=g)
    for i in range(1, n, 2):
        keep = torch.zeros(d)
        keep[torch.randperm(d, generator=g)[:3]] = 1
        z[i] *= keep
    z = z / z.norm(dim=1, keepdim=True) * norms
    return z.reshape(n, c_in, 3, 3)


def _synthetic_net() -> nn.Sequential:
    """Groups '0' (64 Gaussian filters, d=288), '2' (64 Gaussian filters, d=576, smaller sigma so the L2 norms
    match group '0' while the L1 norms do not) and '4' (64 heavy-tailed filters)."""
    net = nn.Sequential(
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3),
    )
    with torch.no_grad():
        net[0].weight.copy_(_gaussian_filters(64, 32, 0.05, seed=0))
        net[2].weight.copy_(_gaussian_filters(64, 64, 0.05 / math.sqrt(2), seed=1))
        net[4].weight.copy_(_heavy_tailed_filters(64, 64, seed=2))
    return net.eval()


@pytest.fixture(scope="module")
def report() -> AnalysisReport:
    net = _synthetic_net()
    return analyze(net, torch.randn(2, 32, 4, 4), ("l1", "l2", "fpgm"), target=0.5)


def test_rank_similarity_and_overlap_basics():
    a = np.arange(10.0)
    same = rank_similarity(a, 3 * a + 1)
    assert same == {"spearman": pytest.approx(1.0), "kendall": pytest.approx(1.0), "topk_jaccard": 1.0}
    reverse = rank_similarity(a, -a)
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["kendall"] == pytest.approx(-1.0)
    assert reverse["topk_jaccard"] == 0.0  # the lowest halves are disjoint
    assert topk_jaccard(a, np.array([0, 1, 2, 3, 9, 5, 6, 7, 8, 4.0]), 0.5) == pytest.approx(4 / 6)
    assert rank_similarity(a, np.ones(10))["spearman"] is None  # undefined for constant scores


def test_applicability_basics():
    entry = applicability([1.0, 2.0, 3.0, 4.0], target=0.5, cv_threshold=0.1)
    assert entry["cv"] == pytest.approx(np.std([1, 2, 3, 4]) / 2.5)
    assert entry["gap"] == pytest.approx((3.5 - 1.5) / 2.5) and entry["margin"] == pytest.approx(1 / 2.5)
    assert entry["applicable"]
    flat = applicability([5.0, 5.01, 4.99, 5.0], cv_threshold=0.1)
    assert flat["cv"] < 0.01 and not flat["applicable"]


def test_gaussian_filters_satisfy_cwda_and_norm_criteria_collapse(report):
    for layer in ("0", "2"):
        cwda = report.cwda[layer]
        assert cwda["gaussian"] and cwda["zero_mean"], cwda
        assert cwda["ks_pvalue"] >= 0.01 and cwda["shapiro_min_pvalue"] * len(cwda["shapiro_pvalues"]) >= 0.01
        assert 0.8 < cwda["diagonality"] < 1.25  # off-diagonal covariance at the i.i.d. noise level
        assert len(cwda["shapiro_pvalues"]) == 10
    for pair, entry in report.similarity["0"].items():
        assert entry["spearman"] > 0.9, pair  # L1, L2, FPGM rank the filters almost identically
        assert entry["topk_jaccard"] > 0.6, pair
    for criterion in ("l1", "l2", "fpgm"):
        entry = report.applicability["0"][criterion]
        assert entry["cv"] < 0.1 and not entry["applicable"]  # CV ≈ 1/sqrt(2d): scores too close together
        assert "0" in report.not_applicable(criterion)
    # the report's correlations are scipy's on the actual weights
    w = _synthetic_net()[0].weight.detach().reshape(64, -1).double()
    expected = stats.spearmanr(w.abs().sum(1).numpy(), w.norm(dim=1).numpy()).statistic
    assert report.spearman("l1", "l2", group="0") == pytest.approx(expected)


def test_heavy_tailed_filters_reject_cwda_and_criteria_diverge(report):
    cwda = report.cwda["4"]
    assert not cwda["gaussian"]
    assert cwda["ks_pvalue"] < 1e-6 and cwda["shapiro_min_pvalue"] < 1e-4
    rho = report.spearman("l1", "l2", group="4")
    assert rho < 0.8 and report.similarity["4"]["l1|l2"]["topk_jaccard"] < 0.6
    assert report.applicability["4"]["l1"]["applicable"] and report.applicability["4"]["l2"]["applicable"]
    assert report.global_similarity["l1|l2"]["min_spearman"] == pytest.approx(rho)


def test_global_threshold_ratios_differ_between_l1_and_l2(report):
    """Paper 1: for Gaussian filters ‖F‖₂ ≈ σ√d but ‖F‖₁ ≈ σd√(2/π), so one global L1 threshold prunes the
    layer with the smaller d first while L2 (equal norms by construction) treats both alike."""
    l1, l2 = report.global_ratios["l1"], report.global_ratios["l2"]
    assert l1["0"] - l1["2"] > 0.4
    assert abs(l2["0"] - l2["2"]) < 0.3
    for criterion in ("l1", "l2", "fpgm"):
        removed = sum(report.global_ratios[criterion][g] * 64 for g in ("0", "2", "4"))
        assert removed == pytest.approx(0.5 * 192)


def test_report_json_round_trip_and_summary(report, tmp_path):
    path = report.to_json(tmp_path / "r" / "report.json")
    data = json.loads(path.read_text())  # strict JSON: no NaN
    assert set(data) >= {"similarity", "applicability", "cwda", "global_ratios", "scores"}
    again = AnalysisReport.from_json(path)
    assert again == report
    assert again.scores["l2"]["0"] == report.scores["l2"]["0"] and len(again.scores["l2"]["0"]) == 64
    text = report.summary()
    assert "l1|l2" in text and "CWDA: 2/3" in text and "0.0" in text


def test_figures_are_non_empty_pngs(report, tmp_path):
    paths = report.save_figures(tmp_path / "figs", max_panels=4)
    names = {p.name for p in paths}
    assert names == {"similarity_heatmap.png", "score_histograms.png", "global_ratios.png", "qq_plots.png"}
    for p in paths:
        content = p.read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 5000


def test_data_driven_criteria_need_a_dataloader():
    net = _synthetic_net()
    with pytest.raises(ValueError, match="dataloader"):
        analyze(net, torch.randn(2, 32, 4, 4), ("l2", "activation_mean"))
    with pytest.raises(ValueError, match="target"):
        analyze(net, torch.randn(2, 32, 4, 4), target=1.0)


def _digits(n: int = 256):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:n], dtype=torch.long)
    return x, y


def test_data_driven_criterion_on_digits():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune.models import create_model

    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_channels=1, width=4).eval()
    x, y = _digits(128)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    rep = analyze(model, x[:2], ("l2", "activation_mean"), loader, cwda=False)
    assert rep.criteria == ["l2", "activation_mean"] and rep.cwda == {}
    assert set(rep.similarity) == {g for g in rep.groups}
    for g, info in rep.groups.items():
        assert len(rep.scores["activation_mean"][g]) == info["size"]
        assert rep.similarity[g]["l2|activation_mean"]["topk_jaccard"] is not None


def test_command_line_on_a_saved_model(tmp_path):
    from lightning_prune.criteria import get
    from lightning_prune.models import create_model
    from lightning_prune.structure import DependencyGraph

    torch.manual_seed(3)
    model = create_model("digits_cnn", num_classes=10, in_channels=1, width=4)
    with torch.no_grad():
        model.features[0].weight.mul_(torch.linspace(0.5, 2.0, 4)[:, None, None, None])  # distinguishable
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_prune.analysis", "--model", "digits_cnn", "--model-kwargs", '{"width": 4}',
         "--checkpoint", str(tmp_path / "model.pt"), "--criteria", "l1", "l2", "--out", str(out), "--no-figures"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "l1|l2" in result.stdout
    rep = AnalysisReport.from_json(out / "report.json")
    graph = DependencyGraph(model, torch.randn(2, 1, 8, 8))
    l2 = get("l2")
    for g in graph.groups:  # the saved weights were loaded
        assert rep.scores["l2"][g.name] == pytest.approx(l2.score(g).tolist())
    assert rep.meta["model_name"] == "digits_cnn"

    from lightning_prune.analysis.__main__ import main

    with pytest.raises(SystemExit, match="--model is required"):
        main(["--out", str(out)])


def test_callback_runs_at_chosen_epochs_and_logs_to_tensorboard(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune.callbacks.analysis import CriteriaAnalysis
    from lightning_prune.classification import ClassificationModule

    x, y = _digits(128)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    module = ClassificationModule(model="digits_cnn", num_classes=10, in_channels=1, model_kwargs={"width": 4},
                                  example_input_shape=(1, 8, 8), lr=0.05)
    modes = []

    class RecordMode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.training)

    analysis = CriteriaAnalysis(epochs=[1], criteria=("l1", "l2"), figures=True, max_samples=2000)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, logger=logger, callbacks=[analysis, RecordMode()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, num_sanity_val_steps=0, limit_val_batches=0,
                         log_every_n_steps=1)
    trainer.fit(module, loader)
    assert set(analysis.reports) == {1}
    assert all(modes) and len(modes) == 4  # training mode restored after the analysis
    out = Path(trainer.log_dir) / "criteria_analysis" / "epoch_001"
    assert AnalysisReport.from_json(out / "report.json") == analysis.reports[1]
    assert analysis.reports[1].meta["epoch"] == 1
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "criteria_analysis/mean_cv/l2" in tags["scalars"]
    assert "criteria_analysis/pooled_spearman/l1_vs_l2" in tags["scalars"]
    assert "criteria_analysis/similarity_heatmap" in tags["images"]
    with pytest.raises(ValueError, match="epochs"):
        CriteriaAnalysis(epochs=[-1])

    # the command line rebuilds the network from a Lightning checkpoint's hyper-parameters (no --model)
    from lightning_prune.analysis.__main__ import main

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert main(["--checkpoint", str(tmp_path / "last.ckpt"), "--criteria", "l1", "l2", "--out",
                 str(tmp_path / "cli"), "--no-figures"]) == 0
    cli = AnalysisReport.from_json(tmp_path / "cli" / "report.json")
    trained = analysis.reports[1]  # analysed the LightningModule, whose groups live under "model."
    assert cli.meta["model_name"] == "digits_cnn"
    assert set(cli.groups) == {name[len("model."):] for name in trained.groups}
    final = module.model.features[0].weight.detach().reshape(4, -1).norm(dim=1).double()
    assert cli.scores["l2"]["features.0"] == pytest.approx(final.tolist())
