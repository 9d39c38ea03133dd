"""ImageNet (ILSVRC-2012) datamodule over class folders; also the shared ImageNet-style transforms."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from ..errors import check_int
from .base import DatasetCorruptedError, DatasetNotFoundError, ImageClassificationDataModule, ImageFileDataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetDataModule",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

META_FILE = "meta.bin"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"


def imagenet_train_transform(image_size: int = 224) -> transforms.Compose:
    """``RandomResizedCrop(image_size)``, horizontal flip, ``ToTensor``, ImageNet normalisation."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_eval_transform(image_size: int = 224) -> transforms.Compose:
    """``Resize(int(image_size / 0.875))``, ``CenterCrop(image_size)``, ``ToTensor``, normalisation."""
    return transforms.Compose(
        [
            transforms.Resize(int(image_size / 0.875)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet from class folders; the official validation set is the test set.

    Accepted layouts under ``data_dir``:

    * torchvision's prepared ImageNet (what ``torchvision.datasets.ImageNet`` leaves after
      extracting the archives)::

          meta.bin                         # or ILSVRC2012_devkit_t12.tar.gz, parsed into meta.bin
          train/n01440764/*.JPEG ...       # one folder per WordNet id
          val/n01440764/*.JPEG ...

    * plain class folders (any class names, e.g. an ImageNet subset)::

          train/<class>/*.JPEG
          val/<class>/*.JPEG

    Class indices follow the sorted ``train/`` folder names (the torchvision convention);
    ``class_names`` come from ``meta.bin`` (first synonym, e.g. ``"tench"``) when present, else
    the folder names. ``wnids`` holds the folder names. If ``meta.bin`` is missing but the
    devkit archive is present, it is parsed with torchvision's ``parse_devkit_archive``
    (needs scipy, and checks the archive's md5). ``val/`` may lack some classes.

    ImageNet cannot be downloaded automatically: ``download=True`` raises ``ValueError``.
    Obtain the archives from image-net.org and run ``torchvision.datasets.ImageNet(data_dir,
    split=...)`` once to extract them into the layout above.

    The validation split is carved from ``train/`` (``val_fraction``, default 0.01, i.e. about
    12,800 images, stratified and seeded) and uses the evaluation transforms.

    Args:
        image_size: Training crop and evaluation centre-crop size.
        Others: see :class:`~lightning_prune.datamodules.base.ImageClassificationDataModule`.
    """

    def __init__(
        self,
        data_dir: str | Path = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = False,
        val_fraction: float = 0.01,
        seed: int = 42,
        download: bool = False,
        image_size: int = 224,
    ) -> None:
        if download:
            raise ValueError(
                "ImageNet cannot be downloaded automatically (download=True). Obtain ILSVRC-2012 from "
                "https://image-net.org, then run torchvision.datasets.ImageNet(data_dir, split='train') and "
                "split='val' once to extract it, or arrange plain train/<class>/ and val/<class>/ folders."
            )
        super().__init__(data_dir, batch_size, num_workers, pin_memory, val_fraction, seed, download)
        check_int("image_size", image_size, minimum=1)
        self.save_hyperparameters()
        self.image_size = image_size
        self.example_input_shape = (3, image_size, image_size)
        self.wnids: list[str] | None = None

    @property
    def train_dir(self) -> Path:
        return self.data_dir / "train"

    @property
    def val_dir(self) -> Path:
        return self.data_dir / "val"

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of ``train/`` class folders when present, else 1000."""
        if self.wnids is None and self.train_dir.is_dir():
            self.wnids = _class_folders(self.train_dir)
        return len(self.wnids) if self.wnids else 1000

    def expected_layout(self) -> str:
        return (
            f"  {self.data_dir}/\n"
            "    meta.bin or ILSVRC2012_devkit_t12.tar.gz   (optional: class names)\n"
            "    train/<wnid or class>/*.JPEG\n"
            "    val/<wnid or class>/*.JPEG"
        )

    def _require_dir(self, directory: Path) -> None:
        if directory.is_dir() and _class_folders(directory):
            return
        if directory.is_dir() and any(directory.iterdir()):
            hint = (
                f"{directory} has files but no class folders. If it holds the 50,000 flat validation "
                "images, torchvision.datasets.ImageNet(data_dir, split='val') sorts them into class folders "
                "using the devkit.\n"
            )
        else:
            hint = f"{directory} is missing or has no class folders.\n"
        raise DatasetNotFoundError(
            f"ImageNet not found: {hint}Expected layout:\n{self.expected_layout()}\n"
            "ImageNet is never downloaded automatically; see the ImageNetDataModule docstring.",
            directory,
        )

    def prepare_data(self) -> None:
        """Check the folders and, if needed, write ``meta.bin`` from the devkit archive (rank zero only)."""
        self._require_dir(self.train_dir)
        self._require_dir(self.val_dir)
        self._load_meta()

    def _load_meta(self) -> dict[str, tuple[str, ...]] | None:
        """``wnid -> class names`` from ``meta.bin`` (parsed from the devkit if needed), else None."""
        meta_path = self.data_dir / META_FILE
        devkit_path = self.data_dir / DEVKIT_ARCHIVE
        if not meta_path.is_file() and devkit_path.is_file():
            try:
                from torchvision.datasets.imagenet import parse_devkit_archive

                parse_devkit_archive(str(self.data_dir))
            except ImportError as error:
                raise ImportError(f"Parsing {devkit_path} needs scipy (pip install scipy): {error}") from error
            except Exception as error:  # md5 mismatch (RuntimeError), broken tar or .mat file
                raise DatasetCorruptedError(f"Cannot parse the ImageNet devkit archive {devkit_path}: {error}", devkit_path) from error
        if not meta_path.is_file():
            return None
        try:
            wnid_to_classes, _val_wnids = torch.load(meta_path, weights_only=True)
            return {str(wnid): tuple(names) for wnid, names in dict(wnid_to_classes).items()}
        except Exception as error:
            raise DatasetCorruptedError(
                f"Cannot read {meta_path} (expected torch.save((wnid_to_classes, val_wnids)) as written by torchvision): {error}",
                meta_path,
            ) from error

    def _scan(self, directory: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
        try:
            return make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        except OSError as error:
            raise DatasetNotFoundError(f"Cannot list {directory}: {error}", directory) from error

    def _class_index(self) -> dict[str, int]:
        self._require_dir(self.train_dir)
        self.wnids = _class_folders(self.train_dir)
        meta = self._load_meta()
        self.class_names = [meta[w][0] if meta and meta.get(w) else w for w in self.wnids]
        return {wnid: index for index, wnid in enumerate(self.wnids)}

    def _load_train_views(self) -> tuple[Dataset, Dataset, list[int]]:
        class_to_idx = self._class_index()
        samples = self._scan(self.train_dir, class_to_idx)
        if not samples:
            raise DatasetNotFoundError(f"No images ({', '.join(IMG_EXTENSIONS)}) under {self.train_dir}", self.train_dir)
        return (
            ImageFileDataset(samples, imagenet_train_transform(self.image_size)),
            ImageFileDataset(samples, imagenet_eval_transform(self.image_size)),
            [label for _, label in samples],
        )

    def _load_test_dataset(self) -> Dataset:
        class_to_idx = self._class_index()
        self._require_dir(self.val_dir)
        unknown = sorted(set(_class_folders(self.val_dir)) - set(class_to_idx))
        if unknown:
            raise DatasetCorruptedError(
                f"{self.val_dir} has class folders that train/ lacks: {', '.join(unknown[:10])}"
                + (" ..." if len(unknown) > 10 else ""),
                self.val_dir,
            )
        samples = self._scan(self.val_dir, class_to_idx)
        if not samples:
            raise DatasetNotFoundError(f"No images ({', '.join(IMG_EXTENSIONS)}) under {self.val_dir}", self.val_dir)
        return ImageFileDataset(samples, imagenet_eval_transform(self.image_size))


def _class_folders(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
