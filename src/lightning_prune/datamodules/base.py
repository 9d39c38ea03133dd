"""Shared machinery of the image-classification datamodules.

Every datamodule splits a seeded, class-stratified validation set off the *training* data
(``val_fraction``); the official test set is never used for model selection, sensitivity
analysis or blending. The validation split and :meth:`~ImageClassificationDataModule.scoring_dataloader`
read the training images through evaluation transforms (no augmentation): each datamodule
builds two views of the same training files, one augmented and one not, and indexes them
with disjoint index sets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ArgumentTypeError, check_bool, check_fraction, check_int

__all__ = [
    "DatasetCorruptedError",
    "DatasetNotFoundError",
    "ImageClassificationDataModule",
    "ImageFileDataset",
    "TensorImageDataset",
    "load_rgb_image",
    "stratified_split",
]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where the datamodule looks for them.

    The message names the missing path and shows the expected directory layout.
    ``path`` holds the missing path.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


class DatasetCorruptedError(RuntimeError):
    """A dataset file exists but cannot be read (corrupt pickle, unreadable image, bad content).

    The message names the file; ``path`` holds it.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def stratified_split(targets: Sequence[int] | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(targets))`` into ``(kept, held_out)`` index arrays, stratified by class.

    ``held_out`` has ``round(fraction * len(targets))`` indices (at least one when
    ``fraction > 0``) and every class contributes in proportion to its size. The split is a
    pure function of ``(targets, fraction, seed)``. Both arrays are sorted.
    """
    labels = np.asarray(targets)
    n = len(labels)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n_held = int(round(fraction * n))
    if fraction > 0:
        n_held = max(1, n_held)
    if n_held >= n:
        raise ValueError(f"cannot hold out {n_held} of {n} samples and keep any (fraction={fraction})")
    rng = np.random.default_rng(seed)
    # Rank each sample within its (shuffled) class and normalise by the class size; taking
    # the n_held smallest keys takes every class in proportion. Random tie-breaking decides
    # which classes round up.
    keys = np.empty(n, dtype=np.float64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.lexsort((rng.permutation(n), keys))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def load_rgb_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB (grayscale, palette and CMYK images are converted).

    Raises:
        DatasetCorruptedError: naming ``path`` if the file cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DatasetCorruptedError(f"Cannot read image file {path}: {error}", path) from error


class ImageFileDataset(Dataset):
    """``(image, label)`` pairs from a list of ``(path, label)`` samples, images loaded as RGB."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Any], Any] | None = None) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_rgb_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class TensorImageDataset(Dataset):
    """In-memory images: a ``(N, C, H, W)`` tensor (uint8 in 0..255 or float in 0..1) and labels.

    Items are float tensors in ``[0, 1]`` passed through ``transform`` (which sees tensors,
    not PIL images).
    """

    def __init__(
        self, images: torch.Tensor, targets: Sequence[int] | torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.float().div(255) if image.dtype == torch.uint8 else image
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base class: splitting, dataloaders and the common constructor arguments.

    Args:
        data_dir: Root directory of the dataset files (layout: see each subclass).
        batch_size: Batch size of every dataloader.
        num_workers: DataLoader worker processes (``persistent_workers`` is enabled when > 0).
        pin_memory: Pin host memory in the dataloaders (useful with a GPU).
        val_fraction: Fraction of the training set held out as the validation split, stratified
            by class and seeded by ``seed``. ``0`` disables validation (empty val loader).
        seed: Seed of every split this datamodule makes.
        download: Download the dataset in :meth:`prepare_data` if it is missing. With
            ``False``, missing files raise :class:`DatasetNotFoundError`.

    Attributes:
        num_classes: Number of classes.
        example_input_shape: ``(C, H, W)`` of one input image.
        class_names: Class names, index-aligned with the labels (available after ``setup``
            for datasets whose names come from disk).
        train_dataset, val_dataset, test_dataset, scoring_dataset: The datasets after ``setup``.
        train_indices, val_indices: Indices of the split into the full training set.

    Subclasses implement :meth:`_load_train_views`, :meth:`_load_test_dataset` and, for
    downloads and early checks, :meth:`prepare_data`.
    """

    num_classes: int
    example_input_shape: tuple[int, int, int]

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 42,
        download: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ArgumentTypeError(f"data_dir must be a path (str or os.PathLike), got {data_dir!r} "
                                    f"({type(data_dir).__name__}).")
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_fraction("val_fraction", val_fraction)
        check_int("seed", seed)
        check_bool("pin_memory", pin_memory)
        check_bool("download", download)
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_fraction = val_fraction
        self.seed = seed
        self.download = download
        self.class_names: list[str] | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.scoring_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    # --- subclass hooks ---------------------------------------------------------------------

    def _load_train_views(self) -> tuple[Dataset, Dataset, Sequence[int]]:
        """Return ``(augmented_view, eval_view, targets)`` of the full training set.

        Both views must list the same samples in the same order.
        """
        raise NotImplementedError

    def _load_test_dataset(self) -> Dataset:
        """Return the test set with evaluation transforms."""
        raise NotImplementedError

    # --- Lightning API ----------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage`` (``"fit"``, ``"validate"``, ``"test"`` or ``None`` = all)."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            augmented, plain, targets = self._load_train_views()
            if len(augmented) != len(plain) or len(plain) != len(targets):
                raise RuntimeError("training views disagree in length")  # a subclass bug
            train_idx, val_idx = stratified_split(targets, self.val_fraction, self.seed)
            self.train_indices, self.val_indices = train_idx, val_idx
            self.train_dataset = Subset(augmented, train_idx.tolist())
            self.val_dataset = Subset(plain, val_idx.tolist())
            self.scoring_dataset = Subset(plain, train_idx.tolist())
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._load_test_dataset()

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training split."""
        self._ensure_setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split held out of the training set (evaluation transforms)."""
        self._ensure_setup("fit")
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The official test set (evaluation transforms)."""
        self._ensure_setup("test")
        return self._loader(self.test_dataset, shuffle=False)

    def scoring_dataloader(self, batch_size: int | None = None, shuffle: bool = True) -> DataLoader:
        """The training split *without* augmentation, for data-driven pruning criteria.

        Shuffled by default with a generator seeded by ``seed``, so that the first few batches
        cover many classes (Caltech-101 and ImageNet are stored class by class) and are the
        same batches on every call.
        """
        self._ensure_setup("fit")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return self._loader(self.scoring_dataset, shuffle=shuffle, batch_size=batch_size, generator=generator)

    # --- helpers ----------------------------------------------------------------------------

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A zero tensor of shape ``(batch_size, *example_input_shape)`` (for tracing and FLOPs)."""
        return torch.zeros(batch_size, *self.example_input_shape)

    def _ensure_setup(self, stage: str) -> None:
        needed = self.test_dataset if stage == "test" else self.train_dataset
        if needed is None:
            self.setup(stage)

    def _loader(
        self, dataset: Dataset | None, shuffle: bool, batch_size: int | None = None, generator: torch.Generator | None = None
    ) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )
