"""CIFAR-10 and CIFAR-100 datamodules reading torchvision's on-disk (pickled batch) format."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from .base import DatasetCorruptedError, DatasetNotFoundError, ImageClassificationDataModule, TensorImageDataset

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class _CIFARDataModule(ImageClassificationDataModule):
    """Common code; subclasses fill in the dataset constants below."""

    dataset_name: str
    base_folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    label_names_key: str
    url: str
    archive_name: str
    archive_md5: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    example_input_shape = (3, 32, 32)

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
        super().__init__(data_dir, batch_size, num_workers, pin_memory, val_fraction, seed, download)
        self.save_hyperparameters()

    @property
    def dataset_dir(self) -> Path:
        """``<data_dir>/<base_folder>``, the folder holding the pickled batches."""
        return self.data_dir / self.base_folder

    def expected_layout(self) -> str:
        files = [*self.train_files, *self.test_files, self.meta_file]
        lines = [f"  {self.data_dir}/", f"    {self.base_folder}/"] + [f"      {name}" for name in files]
        return "\n".join(lines)

    def _missing_files(self) -> list[Path]:
        required = [*self.train_files, *self.test_files]
        return [self.dataset_dir / name for name in required if not (self.dataset_dir / name).is_file()]

    def _check_exists(self) -> None:
        missing = self._missing_files()
        if missing:
            what = (
                f"missing {', '.join(str(p) for p in missing)}"
                if self.dataset_dir.is_dir()
                else f"{self.dataset_dir} does not exist"
            )
            raise DatasetNotFoundError(
                f"{self.dataset_name} not found: {what}.\n"
                f"Expected layout (torchvision's format):\n{self.expected_layout()}\n"
                f"Pass download=True to download it (Lightning calls prepare_data() for you; "
                f"call it yourself when not using a Trainer).",
                missing[0] if self.dataset_dir.is_dir() else self.dataset_dir,
            )

    def prepare_data(self) -> None:
        """Download and extract the archive when ``download=True`` and files are missing."""
        if self.download and self._missing_files():
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(self.url, str(self.data_dir), filename=self.archive_name, md5=self.archive_md5)
        self._check_exists()

    def _read_batches(self, names: tuple[str, ...]) -> tuple[torch.Tensor, list[int]]:
        self._check_exists()
        images, labels = [], []
        for name in names:
            entry = _load_pickle(self.dataset_dir / name)
            path = self.dataset_dir / name
            try:
                data = np.asarray(entry["data"], dtype=np.uint8)
                batch_labels = [int(label) for label in entry[self.label_key]]
                data = data.reshape(-1, 3, 32, 32)
            except (KeyError, ValueError, TypeError) as error:
                raise DatasetCorruptedError(
                    f"{path} is not a {self.dataset_name} batch file (expected keys 'data' with Nx3072 uint8 "
                    f"pixels and '{self.label_key}'): {error!r}",
                    path,
                ) from error
            if len(batch_labels) != len(data):
                raise DatasetCorruptedError(f"{path}: {len(data)} images but {len(batch_labels)} labels", path)
            if batch_labels and not 0 <= min(batch_labels) <= max(batch_labels) < self.num_classes:
                raise DatasetCorruptedError(f"{path}: labels outside 0..{self.num_classes - 1}", path)
            images.append(data)
            labels.extend(batch_labels)
        return torch.from_numpy(np.concatenate(images)), labels

    def _read_class_names(self) -> list[str]:
        path = self.dataset_dir / self.meta_file
        if not path.is_file():
            return [str(i) for i in range(self.num_classes)]
        try:
            return [str(name) for name in _load_pickle(path)[self.label_names_key]]
        except (KeyError, TypeError) as error:
            raise DatasetCorruptedError(f"{path} has no '{self.label_names_key}' entry: {error!r}", path) from error

    def build_train_transform(self) -> transforms.Compose:
        """Random crop 32 with 4-pixel zero padding, horizontal flip, normalisation (on tensors)."""
        return transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.Normalize(self.mean, self.std)]
        )

    def build_eval_transform(self) -> transforms.Compose:
        """Normalisation only."""
        return transforms.Compose([transforms.Normalize(self.mean, self.std)])

    def _load_train_views(self) -> tuple[Dataset, Dataset, list[int]]:
        images, labels = self._read_batches(self.train_files)
        self.class_names = self._read_class_names()
        return (
            TensorImageDataset(images, labels, self.build_train_transform()),
            TensorImageDataset(images, labels, self.build_eval_transform()),
            labels,
        )

    def _load_test_dataset(self) -> Dataset:
        images, labels = self._read_batches(self.test_files)
        if self.class_names is None:
            self.class_names = self._read_class_names()
        return TensorImageDataset(images, labels, self.build_eval_transform())


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except OSError:
        raise
    except Exception as error:  # unpickling garbage can raise almost any exception type
        raise DatasetCorruptedError(f"Cannot unpickle {path} (corrupt or truncated?): {error!r}", path) from error


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50,000 train / 10,000 test images, 32x32 RGB, 10 classes).

    Layout under ``data_dir`` (what ``torchvision.datasets.CIFAR10`` downloads)::

        cifar-10-batches-py/
            data_batch_1 ... data_batch_5
            test_batch
            batches.meta

    Training augmentation: random crop 32 with padding 4 and horizontal flip; all splits are
    normalised with the CIFAR-10 mean/std. The validation split (``val_fraction`` of the 50,000
    training images, stratified, seeded) uses no augmentation; ``test_dataloader`` is the
    official 10,000-image test batch. The batches are read with ``pickle`` directly (no md5
    check), so any file in the same format works. See
    :class:`~lightning_prune.datamodules.base.ImageClassificationDataModule` for the arguments.
    """

    dataset_name = "CIFAR-10"
    num_classes = 10
    base_folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    label_names_key = "label_names"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive_name = "cifar-10-python.tar.gz"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (50,000 train / 10,000 test images, 32x32 RGB, 100 fine-grained classes).

    Layout under ``data_dir`` (what ``torchvision.datasets.CIFAR100`` downloads)::

        cifar-100-python/
            train
            test
            meta

    Labels are the ``fine_labels``. Same recipe and splits as :class:`CIFAR10DataModule`, with
    the CIFAR-100 mean/std.
    """

    dataset_name = "CIFAR-100"
    num_classes = 100
    base_folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    label_names_key = "fine_label_names"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    archive_name = "cifar-100-python.tar.gz"
    archive_md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
