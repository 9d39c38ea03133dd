"""Datamodules on tiny datasets fabricated in each dataset's real on-disk format."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_prune.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    Caltech101DataModule,
    DatasetCorruptedError,
    DatasetNotFoundError,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DigitsDataModule,
    ImageNetDataModule,
    imagenet_eval_transform,
    stratified_split,
)
from lightning_prune.datamodules.base import load_rgb_image

# --------------------------------------------------------------------------------------------
# fabricators


def write_cifar10(root: Path, per_batch: int = 20, test_size: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test_size)]:
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(size, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(size)],
            "filenames": [f"img_{i}.png" for i in range(size)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle)
    return folder


def write_cifar100(root: Path, train_size: int = 200, test_size: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, size in [("train", train_size), ("test", test_size)]:
        entry = {
            "data": rng.integers(0, 256, size=(size, 3072), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(size)],
            "coarse_labels": [i % 20 for i in range(size)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []}, handle)
    return folder


def write_jpeg(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, "JPEG")


CALTECH_CLASSES = {"Faces": 5, "accordion": 6, "airplanes": 6, "BACKGROUND_Google": 4}


def write_caltech(root: Path, nested: bool = True) -> Path:
    categories = (root / "caltech101" if nested else root) / "101_ObjectCategories"
    for class_index, (name, count) in enumerate(CALTECH_CLASSES.items()):
        for i in range(1, count + 1):
            mode = "L" if (name == "airplanes" and i == 2) else "RGB"
            write_jpeg(categories / name / f"image_{i:04d}.jpg", mode, seed=100 * class_index + i)
    return categories


IMAGENET_WNIDS = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus")}


def write_imagenet_folders(root: Path, classes, train_per_class: int = 5, val_per_class: int = 2) -> None:
    for class_index, name in enumerate(classes):
        for i in range(train_per_class):
            write_jpeg(root / "train" / name / f"{name}_{i}.JPEG", seed=class_index * 50 + i)
        for i in range(val_per_class):
            write_jpeg(root / "val" / name / f"ILSVRC2012_val_{class_index:04d}{i:04d}.JPEG", seed=999 - i)


def write_devkit(root: Path) -> Path:
    """A miniature ILSVRC2012_devkit_t12.tar.gz with the real internal layout (meta.mat, ground truth)."""
    import scipy.io

    build = root / "devkit_build" / "ILSVRC2012_devkit_t12" / "data"
    build.mkdir(parents=True)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    rows = [
        (1, "n01440764", "tench, Tinca tinca", "a fish", 0, np.zeros(0), 0, 1300),
        (2, "n01443537", "goldfish, Carassius auratus", "a fish", 0, np.zeros(0), 0, 1300),
        (1001, "n02512053", "fish", "a parent synset, skipped", 2, np.array([1, 2]), 1, 0),
    ]
    synsets = np.array(rows, dtype=[(f, "O") for f in fields]).reshape(-1, 1)
    scipy.io.savemat(build / "meta.mat", {"synsets": synsets})
    (build / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n1\n2\n")
    archive = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build.parent, arcname="ILSVRC2012_devkit_t12")
    return archive


def batch_of(loader):
    return next(iter(loader))


# --------------------------------------------------------------------------------------------
# shared split helper


def test_stratified_split_is_proportional_seeded_and_disjoint():
    targets = np.repeat(np.arange(4), [10, 20, 30, 40])
    kept, held = stratified_split(targets, 0.1, seed=0)
    assert len(held) == 10 and len(kept) == 90
    assert set(kept).isdisjoint(held) and set(kept) | set(held) == set(range(100))
    assert Counter(targets[held].tolist()) == {0: 1, 1: 2, 2: 3, 3: 4}
    assert np.array_equal(held, stratified_split(targets, 0.1, seed=0)[1])
    assert not np.array_equal(held, stratified_split(targets, 0.1, seed=1)[1])
    assert len(stratified_split(targets, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError):
        stratified_split(targets, 1.0, seed=0)


# --------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_shapes_labels_splits_and_class_names(tmp_path):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(tmp_path, batch_size=8, num_workers=0, val_fraction=0.2, seed=3)
    assert dm.num_classes == 10 and dm.example_input_shape == (3, 32, 32)
    assert dm.example_input(4).shape == (4, 3, 32, 32) and not dm.example_input().any()
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 80 and len(dm.val_dataset) == 20
    # Stratified: 10 images per class in the 100 training images -> 2 per class held out.
    val_labels = [dm.val_dataset[i][1] for i in range(len(dm.val_dataset))]
    assert Counter(val_labels) == {c: 2 for c in range(10)}
    images, labels = batch_of(dm.train_dataloader())
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() < 10
    dm.setup("test")
    assert len(dm.test_dataset) == 20
    assert sum(len(y) for _, y in dm.test_dataloader()) == 20
    assert dm.class_names[:2] == ["airplane", "automobile"]
    assert len(dm.scoring_dataloader().dataset) == 80


def test_cifar_split_is_deterministic_per_seed(tmp_path):
    write_cifar10(tmp_path)

    def val_indices(seed):
        dm = CIFAR10DataModule(tmp_path, num_workers=0, val_fraction=0.2, seed=seed)
        dm.setup("fit")
        assert set(dm.val_indices).isdisjoint(dm.train_indices)
        return dm.val_indices.tolist()

    assert val_indices(0) == val_indices(0)
    assert val_indices(0) != val_indices(1)


def test_cifar_val_and_scoring_use_eval_transforms_train_is_augmented(tmp_path):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(tmp_path, num_workers=0, val_fraction=0.2)
    dm.setup("fit")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")["data"]
    mean = torch.tensor(CIFAR10DataModule.mean).view(3, 1, 1)
    std = torch.tensor(CIFAR10DataModule.std).view(3, 1, 1)

    def expected(index):  # index < 20 lies in data_batch_1
        return (torch.from_numpy(raw[index]).view(3, 32, 32).float() / 255 - mean) / std

    val_index = next(i for i in dm.val_indices if i < 20)
    val_position = dm.val_indices.tolist().index(val_index)
    assert torch.allclose(dm.val_dataset[val_position][0], expected(val_index), atol=1e-5)
    train_index = next(i for i in dm.train_indices if i < 20)
    position = dm.train_indices.tolist().index(train_index)
    assert torch.allclose(dm.scoring_dataset[position][0], expected(train_index), atol=1e-5)
    torch.manual_seed(0)
    draws = [dm.train_dataset[position][0] for _ in range(8)]
    assert any(not torch.allclose(d, expected(train_index)) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_cifar_missing_files_give_clear_error(tmp_path):
    dm = CIFAR10DataModule(tmp_path / "nowhere", num_workers=0)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message and "download=True" in message
    assert isinstance(info.value, FileNotFoundError)

    folder = write_cifar10(tmp_path / "partial")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as info:
        CIFAR10DataModule(tmp_path / "partial", num_workers=0).prepare_data()
    assert info.value.path == str(folder / "data_batch_3")


def test_cifar_corrupt_pickle_names_the_file(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"this is not a pickle")
    with pytest.raises(DatasetCorruptedError) as info:
        CIFAR10DataModule(tmp_path, num_workers=0).setup("fit")
    assert str(folder / "data_batch_2") in str(info.value)

    with open(folder / "data_batch_2", "wb") as handle:
        pickle.dump({"data": np.zeros((3, 100), dtype=np.uint8), "labels": [0, 1, 2]}, handle)
    with pytest.raises(DatasetCorruptedError, match="data_batch_2"):
        CIFAR10DataModule(tmp_path, num_workers=0).setup("fit")


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    dm = CIFAR100DataModule(tmp_path, batch_size=50, num_workers=0, val_fraction=0.5)
    assert dm.num_classes == 100
    dm.setup()
    assert len(dm.train_dataset) == 100 and len(dm.val_dataset) == 100 and len(dm.test_dataset) == 100
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert labels.max() >= 20  # fine labels, not the 20 coarse ones
    assert sorted(labels.tolist()) == list(range(100))  # 2 per class, 1 per class held out
    assert dm.class_names[5] == "class5"


def test_persistent_workers_only_with_workers(tmp_path):
    write_cifar10(tmp_path)
    without = CIFAR10DataModule(tmp_path, num_workers=0)
    with_workers = CIFAR10DataModule(tmp_path, num_workers=1)
    assert without.train_dataloader().persistent_workers is False
    loader = with_workers.train_dataloader()
    assert loader.persistent_workers is True and loader.num_workers == 1


# --------------------------------------------------------------------------------------------
# Caltech-101


def test_caltech_default_excludes_background(tmp_path):
    write_caltech(tmp_path)
    dm = Caltech101DataModule(tmp_path, batch_size=4, num_workers=0, image_size=32, train_per_class=3, val_fraction=0.2)
    assert dm.num_classes == 3
    dm.setup()
    assert dm.class_names == ["Faces", "accordion", "airplanes"]
    # 3 per class for training (9), the rest (2 + 3 + 3) for testing.
    assert len(dm.train_dataset) + len(dm.val_dataset) == 9
    assert len(dm.val_dataset) == 2
    assert len(dm.test_dataset) == 8
    assert all("BACKGROUND_Google" not in path for path, _ in dm.train_samples + dm.test_samples)
    images, labels = batch_of(dm.train_dataloader())
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1, 2}
    test_labels = Counter(label for _, label in dm.test_samples)
    assert test_labels == {0: 2, 1: 3, 2: 3}


def test_caltech_include_background_and_class_count_before_download(tmp_path):
    assert Caltech101DataModule(tmp_path / "absent").num_classes == 101
    assert Caltech101DataModule(tmp_path / "absent", include_background=True).num_classes == 102
    write_caltech(tmp_path)
    dm = Caltech101DataModule(tmp_path, num_workers=0, image_size=32, train_per_class=3, include_background=True)
    assert dm.num_classes == 4
    dm.setup()
    assert "BACKGROUND_Google" in dm.class_names
    background = dm.class_names.index("BACKGROUND_Google")
    assert Counter(label for _, label in dm.train_samples)[background] == 3


def test_caltech_split_is_deterministic_stratified_and_capped(tmp_path):
    write_caltech(tmp_path)

    def split(seed, **kwargs):
        dm = Caltech101DataModule(tmp_path, num_workers=0, image_size=32, train_per_class=3, seed=seed, **kwargs)
        dm.setup()
        return dm

    first, again, other = split(0), split(0), split(1)
    assert first.train_samples == again.train_samples and first.test_samples == again.test_samples
    assert first.train_samples != other.train_samples
    assert set(first.train_samples).isdisjoint(first.test_samples)
    capped = split(0, test_per_class=1)
    assert Counter(label for _, label in capped.test_samples) == {0: 1, 1: 1, 2: 1}
    assert capped.train_samples == first.train_samples
    # A class's split does not depend on which other classes are present.
    with_background = split(0, include_background=True)
    airplanes = [p for p, _ in first.train_samples if "airplanes" in p]
    assert airplanes == [p for p, _ in with_background.train_samples if "airplanes" in p]


def test_caltech_grayscale_images_become_rgb(tmp_path):
    categories = write_caltech(tmp_path)
    gray_path = categories / "airplanes" / "image_0002.jpg"
    assert Image.open(gray_path).mode == "L"
    dm = Caltech101DataModule(tmp_path, num_workers=0, image_size=32, train_per_class=6)
    dm.setup()
    index = [p for p, _ in dm.train_samples].index(str(gray_path))
    plain_view = dm.val_dataset.dataset  # the un-augmented view of all training images
    image, label = plain_view[index]
    assert image.shape == (3, 32, 32) and dm.class_names[label] == "airplanes"
    pixels = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)


def test_caltech_val_uses_eval_transforms(tmp_path):
    write_caltech(tmp_path)
    dm = Caltech101DataModule(tmp_path, num_workers=0, image_size=32, train_per_class=3, val_fraction=0.3)
    dm.setup("fit")
    path, label = dm.train_samples[dm.val_indices[0]]
    expected = imagenet_eval_transform(32)(load_rgb_image(path))
    image, got_label = dm.val_dataset[0]
    assert got_label == label and torch.allclose(image, expected)
    assert torch.allclose(dm.val_dataset[0][0], image)  # deterministic: no augmentation


def test_caltech_flat_layout_is_accepted(tmp_path):
    write_caltech(tmp_path, nested=False)
    dm = Caltech101DataModule(tmp_path, num_workers=0, image_size=32, train_per_class=3)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_dataset) == 8


def test_caltech_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        Caltech101DataModule(tmp_path, num_workers=0).prepare_data()
    assert "101_ObjectCategories" in str(info.value) and str(tmp_path) in str(info.value)

    categories = write_caltech(tmp_path)
    broken = categories / "accordion" / "image_0003.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    dm = Caltech101DataModule(tmp_path, num_workers=0, image_size=32, train_per_class=6)
    dm.setup("fit")
    index = [p for p, _ in dm.train_samples].index(str(broken))
    with pytest.raises(DatasetCorruptedError) as info:
        dm.val_dataset.dataset[index]
    assert str(broken) in str(info.value)


# --------------------------------------------------------------------------------------------
# ImageNet


def test_imagenet_with_meta_bin(tmp_path):
    write_imagenet_folders(tmp_path, IMAGENET_WNIDS)
    torch.save((IMAGENET_WNIDS, ["n01440764", "n01443537"]), tmp_path / "meta.bin")
    dm = ImageNetDataModule(tmp_path, batch_size=4, num_workers=0, image_size=32, val_fraction=0.2)
    assert dm.num_classes == 2 and dm.example_input_shape == (3, 32, 32)
    dm.prepare_data()
    dm.setup()
    assert dm.wnids == ["n01440764", "n01443537"]
    assert dm.class_names == ["tench", "goldfish"]
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2 and len(dm.test_dataset) == 4
    images, labels = batch_of(dm.test_dataloader())
    assert images.shape == (4, 3, 32, 32) and sorted(labels.tolist()) == [0, 0, 1, 1]
    # The validation split comes from train/ and is not augmented.
    path, label = dm.val_dataset.dataset.samples[dm.val_indices[0]]
    assert os.sep + "train" + os.sep in path
    assert torch.allclose(dm.val_dataset[0][0], imagenet_eval_transform(32)(load_rgb_image(path)))


def test_imagenet_plain_class_folders(tmp_path):
    write_imagenet_folders(tmp_path, ["dog", "cat", "bird"], train_per_class=4, val_per_class=1)
    dm = ImageNetDataModule(tmp_path, num_workers=0, image_size=32, val_fraction=0.25, seed=1)
    dm.setup()
    assert dm.class_names == ["bird", "cat", "dog"] and dm.num_classes == 3
    assert Counter(dm.val_dataset.dataset.targets[i] for i in dm.val_indices) == {0: 1, 1: 1, 2: 1}
    test_paths = [p for p, _ in dm.test_dataset.samples]
    assert all(os.sep + "val" + os.sep in p for p in test_paths) and len(test_paths) == 3


def test_imagenet_val_may_lack_classes_but_not_add_them(tmp_path):
    write_imagenet_folders(tmp_path, ["a", "b"], train_per_class=3, val_per_class=1)
    (tmp_path / "val" / "b" / os.listdir(tmp_path / "val" / "b")[0]).unlink()
    dm = ImageNetDataModule(tmp_path, num_workers=0, image_size=32)
    dm.setup("test")
    assert [label for _, label in dm.test_dataset.samples] == [0]

    write_jpeg(tmp_path / "val" / "zebra" / "z.JPEG")
    with pytest.raises(DatasetCorruptedError, match="zebra"):
        ImageNetDataModule(tmp_path, num_workers=0, image_size=32).setup("test")


def test_imagenet_devkit_is_parsed_into_meta_bin(tmp_path, monkeypatch):
    import torchvision.datasets.imagenet as tv_imagenet

    write_imagenet_folders(tmp_path, IMAGENET_WNIDS, train_per_class=2, val_per_class=1)
    archive = write_devkit(tmp_path)
    # torchvision verifies the md5 of the real 2.5 MB devkit; register our miniature one's.
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit", (archive.name, md5))
    dm = ImageNetDataModule(tmp_path, num_workers=0, image_size=32)
    dm.prepare_data()
    assert (tmp_path / "meta.bin").is_file()
    dm.setup("fit")
    assert dm.class_names == ["tench", "goldfish"]


def test_imagenet_devkit_with_wrong_checksum_names_the_archive(tmp_path):
    write_imagenet_folders(tmp_path, IMAGENET_WNIDS, train_per_class=2, val_per_class=1)
    archive = write_devkit(tmp_path)
    with pytest.raises(DatasetCorruptedError) as info:
        ImageNetDataModule(tmp_path, num_workers=0).prepare_data()
    assert str(archive) in str(info.value)


def test_imagenet_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot be downloaded"):
        ImageNetDataModule(tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError) as info:
        ImageNetDataModule(tmp_path, num_workers=0).setup("fit")
    assert str(tmp_path / "train") in str(info.value) and "val/<wnid or class>" in str(info.value)

    write_imagenet_folders(tmp_path, ["a"], train_per_class=2, val_per_class=0)
    write_jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetNotFoundError, match="flat validation"):
        ImageNetDataModule(tmp_path, num_workers=0).prepare_data()

    (tmp_path / "meta.bin").write_bytes(b"garbage")
    with pytest.raises(DatasetCorruptedError, match="meta.bin"):
        ImageNetDataModule(tmp_path, num_workers=0).setup("fit")


# --------------------------------------------------------------------------------------------
# digits (real data, bundled with scikit-learn)


def test_digits_shapes_and_split_sizes():
    dm = DigitsDataModule(batch_size=32)
    assert dm.num_classes == 10 and dm.example_input_shape == (1, 16, 16)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1294, 144, 359)
    assert set(dm.test_indices).isdisjoint(dm.pool_indices)
    assert len(dm.test_indices) + len(dm.pool_indices) == 1797
    assert set(dm.train_indices).isdisjoint(dm.val_indices)
    images, labels = batch_of(dm.train_dataloader())
    assert images.shape == (32, 1, 16, 16) and 0 <= labels.min() and labels.max() <= 9
    all_train = torch.stack([dm.scoring_dataset[i][0] for i in range(len(dm.scoring_dataset))])
    assert abs(all_train.mean().item()) < 0.1 and 0.7 < all_train.std().item() < 1.0  # normalised


def test_digits_stratified_class_balance():
    dm = DigitsDataModule()
    dm.setup()
    for dataset, size in [(dm.test_dataset, 359), (dm.val_dataset, 144)]:
        counts = Counter(int(dataset[i][1]) for i in range(len(dataset)))
        assert sum(counts.values()) == size and len(counts) == 10
        # load_digits has 174..183 images per class: each class gets its share +- 2.
        assert all(abs(count - size / 10) <= 2 for count in counts.values()), counts


def test_digits_split_determinism_and_image_size():
    first, again, other = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (first, again, other):
        dm.setup()
    assert np.array_equal(first.test_indices, again.test_indices)
    assert np.array_equal(first.val_indices, again.val_indices)
    assert not np.array_equal(first.test_indices, other.test_indices)
    small = DigitsDataModule(image_size=8, test_fraction=0.5, val_fraction=0.2)
    small.setup()
    assert small.example_input().shape == (1, 1, 8, 8)
    assert small.train_dataset[0][0].shape == (1, 8, 8)
    assert len(small.test_dataset) == 898 and len(small.val_dataset) == 180


def test_digits_augmentation_only_on_train():
    dm = DigitsDataModule(augment=True)
    dm.setup()
    torch.manual_seed(0)
    draws = [dm.train_dataset[0][0] for _ in range(10)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(dm.val_dataset[0][0], dm.val_dataset[0][0])
    assert torch.equal(dm.scoring_dataset[0][0], dm.scoring_dataset[0][0])
    plain = DigitsDataModule(augment=False)
    plain.setup()
    assert torch.equal(plain.train_dataset[0][0], plain.scoring_dataset[0][0])


def test_scoring_dataloader_is_reproducible_and_unaugmented():
    dm = DigitsDataModule(batch_size=16, augment=True)
    first_x, first_y = batch_of(dm.scoring_dataloader())
    second_x, second_y = batch_of(dm.scoring_dataloader())
    assert torch.equal(first_x, second_x) and torch.equal(first_y, second_y)
    assert len(set(first_y.tolist())) > 3  # shuffled, not one class
    unshuffled = dm.scoring_dataloader(batch_size=5, shuffle=False)
    x, _ = batch_of(unshuffled)
    assert torch.equal(x[0], dm.scoring_dataset[0][0]) and x.shape[0] == 5


def test_invalid_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        CIFAR10DataModule(batch_size=0)
    with pytest.raises(ValueError, match="train_per_class"):
        Caltech101DataModule(train_per_class=0)
