"""scikit-learn's bundled handwritten digits as a tiny, download-free image dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

from ..errors import check_bool, check_fraction, check_int
from .base import ImageClassificationDataModule, TensorImageDataset, stratified_split

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DigitsDataModule"]

# Pixel statistics of all 1,797 images after scaling 0..16 to [0, 1].
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3761


class DigitsDataModule(ImageClassificationDataModule):
    """The scikit-learn digits (1,797 grayscale 8x8 images, 10 classes), for the quick start and tests.

    Images are bundled with scikit-learn (``sklearn.datasets.load_digits``): nothing is
    downloaded and ``data_dir`` is ignored. Pixel values 0..16 are scaled to [0, 1], resized to
    ``image_size`` with bilinear interpolation and normalised. Everything is held in memory.

    Splits (all stratified by class and seeded by ``seed``): ``test_fraction`` of all images
    (default 0.2, 359 images) is the test set; ``val_fraction`` of the rest (default 0.1, 144
    images) is the validation split; the remaining 1,294 images are the training split.
    After ``setup``, ``test_indices`` and ``pool_indices`` index ``load_digits()`` (the train and
    validation splits' ``train_indices`` / ``val_indices`` index the pool).

    Args:
        image_size: Side length of the (square) images; inputs are ``(1, image_size, image_size)``.
        test_fraction: Fraction of all images held out as the test set.
        augment: Random shifts of up to ``max(1, image_size // 8)`` pixels for training.
        Others: see :class:`~lightning_prune.datamodules.base.ImageClassificationDataModule`.
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 42,
        download: bool = False,
        image_size: int = 16,
        test_fraction: float = 0.2,
        augment: bool = False,
    ) -> None:
        super().__init__(data_dir or ".", batch_size, num_workers, pin_memory, val_fraction, seed, download)
        check_int("image_size", image_size, minimum=1)
        check_fraction("test_fraction", test_fraction, allow_zero=False)
        check_bool("augment", augment)
        self.save_hyperparameters()
        self.image_size = image_size
        self.test_fraction = test_fraction
        self.augment = augment
        self.example_input_shape = (1, image_size, image_size)
        self.class_names = [str(digit) for digit in range(10)]
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pool_indices: np.ndarray | None = None
        self.test_indices: np.ndarray | None = None

    def prepare_data(self) -> None:
        """Nothing to do: the data ships with scikit-learn."""

    def _load_splits(self) -> None:
        if self._pool is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.image_size != images.shape[-1]:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0)
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        # A different seed stream from the validation split made later from the pool.
        pool_idx, test_idx = stratified_split(targets.numpy(), self.test_fraction, self.seed + 1_000_003)
        self.pool_indices, self.test_indices = pool_idx, test_idx
        self._pool = (images[pool_idx], targets[pool_idx])
        self._test = (images[test_idx], targets[test_idx])

    def build_train_transform(self) -> transforms.Compose:
        normalize = transforms.Normalize((DIGITS_MEAN,), (DIGITS_STD,))
        if not self.augment:
            return transforms.Compose([normalize])
        shift = max(1, self.image_size // 8)
        return transforms.Compose([transforms.RandomCrop(self.image_size, padding=shift), normalize])

    def build_eval_transform(self) -> transforms.Compose:
        return transforms.Compose([transforms.Normalize((DIGITS_MEAN,), (DIGITS_STD,))])

    def _load_train_views(self) -> tuple[Dataset, Dataset, list[int]]:
        self._load_splits()
        assert self._pool is not None
        images, targets = self._pool
        return (
            TensorImageDataset(images, targets, self.build_train_transform()),
            TensorImageDataset(images, targets, self.build_eval_transform()),
            targets.tolist(),
        )

    def _load_test_dataset(self) -> Dataset:
        self._load_splits()
        assert self._test is not None
        images, targets = self._test
        return TensorImageDataset(images, targets, self.build_eval_transform())
