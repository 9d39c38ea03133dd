"""The ``lightning-prune`` command line: fit / analyze / export in-process, and every shipped config.

Everything runs through :func:`lightning_prune.cli.main` exactly as the console script calls it (no mocks);
configs whose datasets are absent run on tiny datasets fabricated in the real on-disk formats.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_prune import load_pruned
from lightning_prune.classification import ClassificationModule
from lightning_prune.cli import main

from .test_datamodules import write_caltech, write_cifar10, write_cifar100, write_imagenet_folders

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    # main(args) is the console script with explicit arguments; pytest's own argv must not look like extra ones.
    monkeypatch.setattr(sys, "argv", ["lightning-prune"])


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convolutions are much slower with two contending threads on a 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# quick start: fit, then analyze and export its checkpoint


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """``lightning-prune fit --config configs/quickstart.yaml`` shortened to 2 epochs, pruning at epoch 1."""
    root = tmp_path_factory.mktemp("quickstart")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # relative paths of the config (outputs/quickstart) stay inside tmp
        patch.setattr(sys, "argv", ["lightning-prune"])
        import io
        from contextlib import redirect_stdout

        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = main([
                "fit", "--config", str(QUICKSTART),
                "--trainer.max_epochs", "2",
                "--trainer.callbacks.epochs", "[1]",
                "--trainer.default_root_dir", str(root),
                "--trainer.logger.init_args.save_dir", str(root / "logs"),
                "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false",
            ])
    torch.set_num_threads(threads)
    output = buffer.getvalue()
    assert code == 0
    return root, output


def _summary_value(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_fit_prints_summary_and_saves_pruned_checkpoint(quickstart):
    root, output = quickstart
    assert "lightning-prune summary" in output
    checkpoint = Path(re.search(r"pruned checkpoint: (\S+)", output).group(1))
    log_dir = Path(re.search(r"logs:\s+(\S+)", output).group(1))
    assert checkpoint == log_dir / "pruned.ckpt" and checkpoint.is_file()
    assert log_dir.parent == root / "logs"
    assert list(log_dir.glob("events.out.tfevents.*")), "TensorBoard event file missing"
    assert f"tensorboard --logdir {root / 'logs'}" in output
    assert "pruning events at epochs: 1" in output

    # accuracy before (validation at the end of epoch 0, before the event at epoch 1) and after
    before, after = _summary_value(output, "val accuracy")
    assert before.endswith("%") and after.endswith("%")
    test_before, test_after = _summary_value(output, "test accuracy")
    assert test_before == "-" and 0.0 < float(test_after.rstrip("%")) <= 100.0
    flops = _summary_value(output, "FLOPs")
    assert flops[2].startswith("(") and "removed" in output

    # the checkpoint rebuilds into the pruned architecture with load_pruned
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["lightning_prune"]["plan"]
    assert "_instantiator" not in saved["hyper_parameters"]
    module = load_pruned(ClassificationModule, str(checkpoint))
    dense = ClassificationModule(**saved["hyper_parameters"])
    assert sum(p.numel() for p in module.parameters()) < 0.7 * sum(p.numel() for p in dense.parameters())
    assert module(torch.zeros(3, 1, 16, 16)).shape == (3, 10)


def test_quickstart_accuracy_is_measured_before_the_first_event(quickstart):
    _, output = quickstart
    assert "before pruning (epoch 0)" in output
    before, after = (float(v.rstrip("%")) for v in _summary_value(output, "val accuracy"))
    assert 0.0 <= before <= 100.0 and 0.0 <= after <= 100.0
    sparsity = _summary_value(output, "channels removed")
    assert sparsity == ["0%", "50.00%"]


def test_accuracy_before_pruning_is_evaluated_when_no_validation_ran(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "2", "--trainer.callbacks.epochs", "[1]",
        "--trainer.check_val_every_n_epoch", "2",  # no validation at the end of epoch 0
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--test_after_fit", "false",
    ])
    output = capsys.readouterr().out
    assert code == 0
    assert "before pruning (epoch 0)" in output
    before, after = _summary_value(output, "val accuracy")
    assert before != "-" and after != "-"
    assert _summary_value(output, "test accuracy") == ["-", "-"]
    assert (tmp_path / "pruned.ckpt").is_file()  # no logger: next to default_root_dir


def test_analyze_writes_json_and_figures(quickstart, tmp_path, capsys):
    root, output = quickstart
    checkpoint = re.search(r"pruned checkpoint: (\S+)", output).group(1)
    out = tmp_path / "analysis"
    code = main(["analyze", "--checkpoint", checkpoint, "--config", str(QUICKSTART),
                 "--criteria", "l1,l2,fpgm", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Criteria analysis: l1, l2, fpgm" in printed
    report = yaml.safe_load((out / "report.json").read_text())  # JSON is YAML
    assert report["criteria"] == ["l1", "l2", "fpgm"]
    assert list(out.glob("*.png"))


def test_analyze_data_driven_criterion_uses_the_config_data(quickstart, tmp_path, capsys):
    _, output = quickstart
    checkpoint = re.search(r"pruned checkpoint: (\S+)", output).group(1)
    out = tmp_path / "analysis"
    code = main(["analyze", "--checkpoint", checkpoint, "--config", str(QUICKSTART), "--criteria", "l1,sd",
                 "--batches", "2", "--out", str(out), "--no-figures"])
    assert code == 0 and "l1, sd" in capsys.readouterr().out
    assert (out / "report.json").is_file() and not list(out.glob("*.png"))
    with pytest.raises(SystemExit, match="need --config"):
        main(["analyze", "--checkpoint", checkpoint, "--criteria", "sd", "--out", str(out)])


def test_analysis_module_command_reads_the_pruned_quickstart_checkpoint(quickstart, tmp_path, capsys):
    """The README's ``python -m lightning_prune.analysis --checkpoint .../pruned.ckpt --out a/``: the plan's groups
    are named on the LightningModule (``model.features.0``), the network analysed is its bare ``model``."""
    from lightning_prune.analysis import AnalysisReport
    from lightning_prune.analysis.__main__ import main as analysis_main

    _, output = quickstart
    checkpoint = re.search(r"pruned checkpoint: (\S+)", output).group(1)
    assert all(name.startswith("model.") for name in torch.load(checkpoint, weights_only=True)
               ["lightning_prune"]["plan"]["groups"])
    out = tmp_path / "a"
    assert analysis_main(["--checkpoint", checkpoint, "--criteria", "l1", "l2", "--out", str(out),
                          "--no-figures"]) == 0
    report = AnalysisReport.from_json(out / "report.json")
    network = load_pruned(ClassificationModule, checkpoint).model
    conv = network.features[0]
    assert conv.out_channels < ClassificationModule(**torch.load(checkpoint, weights_only=True)
                                                    ["hyper_parameters"]).model.features[0].out_channels
    # the scores are those of the pruned, trained weights
    expected = conv.weight.detach().reshape(conv.out_channels, -1).norm(dim=1).double()
    assert report.scores["l2"]["features.0"] == pytest.approx(expected.tolist())


def test_export_onnx_and_torchscript_match_pytorch(quickstart, tmp_path, capsys):
    _, output = quickstart
    checkpoint = re.search(r"pruned checkpoint: (\S+)", output).group(1)
    out = tmp_path / "export"
    code = main(["export", "--checkpoint", checkpoint, "--format", "both", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    onnx_path, script_path = out / "model.onnx", out / "model.torchscript.pt"
    assert onnx_path.is_file() and script_path.is_file()
    assert printed.count("max abs difference") == 2 and "FAILED" not in printed

    # Independent check: the exported files compute what the pruned PyTorch network computes.
    network = load_pruned(ClassificationModule, checkpoint).model.eval()
    inputs = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = network(inputs)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    scripted = torch.jit.load(str(script_path))
    torch.testing.assert_close(scripted(inputs), expected, atol=1e-5, rtol=0)
    # the exported network is the pruned one
    assert sum(p.numel() for p in scripted.parameters()) == sum(p.numel() for p in network.parameters())


def test_export_single_format(quickstart, tmp_path, capsys):
    _, output = quickstart
    checkpoint = re.search(r"pruned checkpoint: (\S+)", output).group(1)
    assert main(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model.torchscript.pt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["export", "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------------
# every config parses, instantiates and runs a fast_dev_run on (fabricated) data


def _fabricate(name: str, root: Path) -> list[str]:
    """Write a tiny dataset for config ``name`` under ``root``; return its command-line overrides."""
    if name.startswith("cifar100"):
        write_cifar100(root)
    elif name.startswith("cifar10"):
        write_cifar10(root)
    elif name.startswith("caltech101"):
        write_caltech(root)  # 3 classes of 5-6 images (the background class is excluded)
        return ["--data.image_size", "32", "--data.train_per_class", "4"]
    elif name.startswith("imagenet"):
        write_imagenet_folders(root, ["n01440764", "n01443537"])
        return ["--data.image_size", "32", "--data.pin_memory", "false"]
    elif name != "quickstart":
        raise AssertionError(f"no test data recipe for configs/{name}.yaml: add one to _fabricate")
    return []


# On the fabricated data the test shrinks the work of the search-based recipes (the criterion, the allocation
# and everything else stay as configured): sensitivity analysis repeats rounds until its FLOPs target, the blend
# search evaluates population x generations masked networks.
SMALLER = {
    "cifar10_vgg16": ["--trainer.callbacks.flops_reduction", "0.005"],
    "imagenet_resnet50_ddp": ["--trainer.callbacks.flops_reduction", "0.001"],
    "cifar100_resnet56": ["--trainer.callbacks.criterion_kwargs",
                          '{"cluster_threshold": 0.2, "population": 3, "generations": 1, "progress": false}'],
}

CONFIG_NAMES = sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def test_configs_exist():
    assert {"quickstart", "cifar10_resnet56", "cifar10_vgg16", "cifar100_resnet56", "caltech101_vgg16",
            "caltech101_resnet18", "imagenet_resnet50_ddp"} <= set(CONFIG_NAMES)
    for name in CONFIG_NAMES:
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        callbacks = config["trainer"]["callbacks"]
        # the CLI overrides below (--trainer.callbacks.X) address the last callback: the PruneCallback
        assert callbacks[-1]["class_path"] == "lightning_prune.callbacks.PruneCallback", name
    ddp = yaml.safe_load((CONFIGS / "imagenet_resnet50_ddp.yaml").read_text())
    prune = ddp["trainer"]["callbacks"][-1]["init_args"]
    assert ddp["trainer"]["strategy"] == "ddp" and ddp["trainer"]["devices"] == "auto"
    assert (prune["flops_reduction"], prune["criterion"], prune["allocation"]) == (0.443, "sd", "sensitivity")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_runs_fast_dev_run(name, tmp_path, capsys):
    overrides = _fabricate(name, tmp_path)
    code = main([
        "fit", "--config", str(CONFIGS / f"{name}.yaml"),
        "--trainer.fast_dev_run", "1",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--trainer.enable_progress_bar", "false",
        "--data.data_dir", str(tmp_path), "--data.batch_size", "2", "--data.num_workers", "0",
        *overrides, *SMALLER.get(name, []),
    ])
    output = capsys.readouterr().out
    assert code == 0
    assert "pruning events at epochs: 0" in output, output[-3000:]
    assert "before pruning (initial)" in output  # first event at epoch 0: the val split is evaluated first
    assert (tmp_path / "pruned.ckpt").is_file()
    flops_before, flops_after = _summary_value(output, "FLOPs")[:2]
    assert flops_before != flops_after
