"""Caltech-101 datamodule with the standard 30-images-per-class training split."""

from __future__ import annotations

import os
import random
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import check_bool, check_int
from .base import DatasetCorruptedError, DatasetNotFoundError, ImageClassificationDataModule, ImageFileDataset
from .imagenet import imagenet_eval_transform, imagenet_train_transform

__all__ = ["BACKGROUND_CLASS", "Caltech101DataModule"]

BACKGROUND_CLASS = "BACKGROUND_Google"
CATEGORIES_FOLDER = "101_ObjectCategories"


class Caltech101DataModule(ImageClassificationDataModule):
    """Caltech-101 (9,144 images of 101 object categories plus a background class).

    Layout (what ``torchvision.datasets.Caltech101`` downloads), either of::

        <data_dir>/caltech101/101_ObjectCategories/<class>/image_0001.jpg ...
        <data_dir>/101_ObjectCategories/<class>/image_0001.jpg ...

    Grayscale images are converted to RGB. The ``BACKGROUND_Google`` folder holds clutter,
    not an object category: it is excluded by default (101 classes, the usual protocol, and
    what torchvision does); ``include_background=True`` keeps it as an ordinary class (102).
    Class indices follow the sorted folder names.

    Caltech-101 has no official split. The deterministic stratified split used here: per
    class, the file names are sorted, shuffled with a generator seeded by ``seed`` and the
    class name, and the first ``train_per_class`` (default 30) images form the training set;
    the rest form the test set, optionally capped at ``test_per_class`` per class. A class
    with no more than ``train_per_class`` images contributes all of them to training. The
    validation split (``val_fraction``) is carved out of the training images, stratified.

    Training: ``RandomResizedCrop(image_size)`` + horizontal flip; evaluation (validation,
    test, scoring): ``Resize(int(image_size / 0.875))`` + ``CenterCrop(image_size)``; both with
    ImageNet normalisation.

    ``download=True`` downloads with torchvision (into ``<data_dir>/caltech101``) in
    :meth:`prepare_data`; otherwise missing files raise :class:`DatasetNotFoundError`.

    Args:
        image_size: Crop size of all splits.
        train_per_class: Training images per class (before the validation split).
        test_per_class: Cap on test images per class (``None``: all remaining images).
        include_background: Keep ``BACKGROUND_Google`` as a class.
        Others: see :class:`~lightning_prune.datamodules.base.ImageClassificationDataModule`.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 42,
        download: bool = False,
        image_size: int = 224,
        train_per_class: int = 30,
        test_per_class: int | None = None,
        include_background: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, pin_memory, val_fraction, seed, download)
        check_int("image_size", image_size, minimum=1)
        check_int("train_per_class", train_per_class, minimum=1)
        check_int("test_per_class", test_per_class, minimum=0, allow_none=True)
        check_bool("include_background", include_background)
        self.save_hyperparameters()
        self.image_size = image_size
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.include_background = include_background
        self.example_input_shape = (3, image_size, image_size)
        self.train_samples: list[tuple[str, int]] | None = None
        self.test_samples: list[tuple[str, int]] | None = None

    # --- locating the files -----------------------------------------------------------------

    def find_categories_dir(self) -> Path | None:
        """The ``101_ObjectCategories`` folder in either accepted location, or None."""
        for candidate in (self.data_dir / "caltech101" / CATEGORIES_FOLDER, self.data_dir / CATEGORIES_FOLDER):
            if candidate.is_dir():
                return candidate
        return None

    def expected_layout(self) -> str:
        return (
            f"  {self.data_dir}/caltech101/{CATEGORIES_FOLDER}/    (or {self.data_dir}/{CATEGORIES_FOLDER}/)\n"
            "    accordion/image_0001.jpg ...\n"
            "    airplanes/image_0001.jpg ...\n"
            f"    ...                    ({BACKGROUND_CLASS}/ is optional)"
        )

    def _categories_dir(self) -> Path:
        found = self.find_categories_dir()
        if found is None:
            expected = self.data_dir / "caltech101" / CATEGORIES_FOLDER
            raise DatasetNotFoundError(
                f"Caltech-101 not found: {expected} does not exist (nor {self.data_dir / CATEGORIES_FOLDER}).\n"
                f"Expected layout:\n{self.expected_layout()}\n"
                "Pass download=True to download it with torchvision (Lightning calls prepare_data() for you).",
                expected,
            )
        return found

    def _class_folders(self, root: Path) -> list[str]:
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
        if not self.include_background:
            names = [name for name in names if name != BACKGROUND_CLASS]
        if not names:
            raise DatasetNotFoundError(f"No class folders in {root}.\nExpected layout:\n{self.expected_layout()}", root)
        return names

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of class folders found on disk; 101 (102 with background) before the data exists."""
        if self.class_names is None:
            root = self.find_categories_dir()
            if root is not None:
                self.class_names = self._class_folders(root)
        if self.class_names is not None:
            return len(self.class_names)
        return 102 if self.include_background else 101

    # --- Lightning hooks --------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download with torchvision when ``download=True`` and the files are missing."""
        if self.download and self.find_categories_dir() is None:
            from torchvision.datasets import Caltech101

            Caltech101(str(self.data_dir), download=True)
        self._categories_dir()

    def _split_files(self) -> None:
        if self.train_samples is not None:
            return
        root = self._categories_dir()
        self.class_names = self._class_folders(root)
        train: list[tuple[str, int]] = []
        test: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            folder = root / name
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise DatasetCorruptedError(f"Class folder {folder} contains no images", folder)
            # Seeding per class name keeps each class's split independent of which other
            # classes exist (e.g. of include_background).
            random.Random(f"caltech101:{self.seed}:{name}").shuffle(files)
            class_train = files[: self.train_per_class]
            class_test = files[self.train_per_class :]
            if self.test_per_class is not None:
                class_test = class_test[: self.test_per_class]
            train += [(str(folder / f), label) for f in sorted(class_train)]
            test += [(str(folder / f), label) for f in sorted(class_test)]
        self.train_samples, self.test_samples = train, test

    def _load_train_views(self) -> tuple[Dataset, Dataset, list[int]]:
        self._split_files()
        assert self.train_samples is not None
        return (
            ImageFileDataset(self.train_samples, imagenet_train_transform(self.image_size)),
            ImageFileDataset(self.train_samples, imagenet_eval_transform(self.image_size)),
            [label for _, label in self.train_samples],
        )

    def _load_test_dataset(self) -> Dataset:
        self._split_files()
        assert self.test_samples is not None
        return ImageFileDataset(self.test_samples, imagenet_eval_transform(self.image_size))
