"""The package as users see it: licence, metadata, what git ignores, and no third-party noise on the console."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_file_is_the_apache_2_text_pyproject_declares():
    assert PYPROJECT["license"] == "Apache-2.0" and PYPROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    # the full text: all nine sections and the appendix, not a stub
    for heading in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty or Additional Liability.",
                    "END OF TERMS AND CONDITIONS", "APPENDIX: How to apply the Apache License to your work."):
        assert heading in text, heading
    assert len(text.split()) > 1500


def test_pyproject_names_people_urls_keywords_and_classifiers():
    assert PYPROJECT["authors"] and PYPROJECT["maintainers"] and "pruning" in PYPROJECT["keywords"]
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(PYPROJECT["urls"])
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in PYPROJECT["classifiers"])
    # a licence expression excludes "License ::" classifiers (PEP 639)
    assert not any(c.startswith("License ::") for c in PYPROJECT["classifiers"])


def test_installed_metadata_has_what_pip_show_prints():
    try:
        metadata = importlib.metadata.metadata("lightning-prune")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lightning-prune is not installed (CI installs it with pip install -e .)")
    assert metadata["Author"] and metadata["Maintainer"] and "pruning" in metadata["Keywords"]
    assert metadata["License-Expression"] == "Apache-2.0"
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL"))
    assert urls["Homepage"] == PYPROJECT["urls"]["Homepage"]


def test_the_readme_commands_outputs_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["outputs/quickstart/version_0/pruned.ckpt", "exported/model.onnx", "analysis/report.json"]
    ignored = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == written
    package = subprocess.run(["git", "check-ignore", "src/lightning_prune/analysis/core.py"], cwd=ROOT)
    assert package.returncode == 1  # the analysis package itself is not ignored


def test_cli_fit_prints_no_torch_jit_script_deprecation_from_fvcore(tmp_path):
    """fvcore scripts its losses with torch.jit.script at import; the FutureWarning is filtered at that import."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("PYTHONWARNINGS", None)  # Python's default filters: a FutureWarning is printed
    command = [
        sys.executable, "-c", "import sys; from lightning_prune.cli import main; sys.exit(main(sys.argv[1:]))",
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "1",
        "--trainer.callbacks.epochs", "[0]", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar",
        "false", "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning-prune summary" in result.stdout  # it counted FLOPs (fvcore was imported)
    assert "torch.jit.script" not in result.stderr + result.stdout
