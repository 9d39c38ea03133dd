"""LightningDataModules for CIFAR-10/100, Caltech-101, ImageNet and scikit-learn digits.

All share :class:`~lightning_prune.datamodules.base.ImageClassificationDataModule`: a seeded,
stratified validation split carved from the training set (never the test set), an
un-augmented :meth:`scoring_dataloader` for data-driven pruning criteria, ``num_classes``,
``example_input_shape`` and :meth:`example_input`.
"""

from .base import (
    DatasetCorruptedError,
    DatasetNotFoundError,
    ImageClassificationDataModule,
    ImageFileDataset,
    TensorImageDataset,
    stratified_split,
)
from .caltech101 import BACKGROUND_CLASS, Caltech101DataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .digits import DigitsDataModule
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule, imagenet_eval_transform, imagenet_train_transform

__all__ = [
    "BACKGROUND_CLASS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "Caltech101DataModule",
    "DatasetCorruptedError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "ImageClassificationDataModule",
    "ImageFileDataset",
    "ImageNetDataModule",
    "TensorImageDataset",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "stratified_split",
]
