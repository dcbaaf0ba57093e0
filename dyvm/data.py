"""Datasets and loaders: ImageNet layout, any image folder, the embedded Animal-MNIST set, a synthetic set.

Every data problem is raised as a `DataError` whose message is one line saying what is wrong and where,
so main.py can print it instead of a stack trace.
"""
import gzip
import hashlib
import importlib.resources
import os
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler
from torchvision import datasets as tv_datasets

DATA_SETS = ("IMNET", "IMAGEFOLDER", "EMBEDDED", "SYNTHETIC")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EMBEDDED_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
EMBEDDED_SIZE = 28
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


class DataError(ValueError):
    """A data set that cannot be used; the message says why in one line."""


class UnreadableImageError(DataError):
    pass


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: tuple


def read_image(path: str) -> Image.Image:
    """PIL loader that turns a broken file into a one-line error naming it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except UnidentifiedImageError:
        raise UnreadableImageError(f"cannot read image {path}: not an image format PIL recognises") from None
    except Exception as e:  # truncated files, permissions, ... (PIL raises OSError, SyntaxError, ...)
        raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _image_folder(root: str, transform) -> tv_datasets.ImageFolder:
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist")
    try:
        return tv_datasets.ImageFolder(root, transform=transform, loader=read_image,
                                       is_valid_file=lambda p: p.endswith(IMAGE_EXTENSIONS))
    except FileNotFoundError as e:  # torchvision: no class folders, or a class folder without images
        raise DataError(f"malformed image folder {root}: {e}; expected one sub-folder of images per class") from None


def _split_folders(data_path: str, train_tf, val_tf, training: bool = True):
    """ImageNet layout: data_path/train/<class>/* and data_path/val/<class>/* with the same classes.
    training=False (--eval): only val/ is needed and read."""
    if not os.path.isdir(data_path):
        raise DataError(f"--data-path {data_path} does not exist")
    missing = [d for d in ("train", "val") if not os.path.isdir(os.path.join(data_path, d))]
    if missing and (training or "val" in missing):
        raise DataError(f"--data-path {data_path} has no {' or '.join(missing)}/ folder; expected the ImageNet "
                        "layout train/<class>/*.JPEG and val/<class>/*.JPEG")
    val = _image_folder(os.path.join(data_path, "val"), val_tf)
    if not training:
        return DataSplits(None, val, len(val.classes), tuple(val.classes))
    train = _image_folder(os.path.join(data_path, "train"), train_tf)
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(f"train/ and val/ in {data_path} hold different classes (e.g. {only})")
    return DataSplits(train, val, len(train.classes), tuple(train.classes))


class _Subset(Dataset):
    """A subset of a folder with its own transform (the seeded train/val split of a plain image folder)."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        img = read_image(path)
        return (self.transform(img) if self.transform else img), target


def _plain_folder(data_path: str, train_tf, val_tf, val_fraction: float, seed: int):
    """Any folder: train/ + val/ if present, else <class>/* split by a seeded shuffle."""
    if os.path.isdir(os.path.join(data_path, "train")) and os.path.isdir(os.path.join(data_path, "val")):
        return _split_folders(data_path, train_tf, val_tf)
    full = _image_folder(data_path, None)
    order = np.random.RandomState(seed).permutation(len(full.samples))
    n_val = max(1, int(round(val_fraction * len(order))))
    if n_val >= len(order):
        raise DataError(f"{data_path} has only {len(order)} images: too few to split off a validation set")
    val = [full.samples[i] for i in order[:n_val]]
    train = [full.samples[i] for i in order[n_val:]]
    return DataSplits(_Subset(train, train_tf), _Subset(val, val_tf), len(full.classes), tuple(full.classes))


def load_embedded_arrays():
    """Animal-MNIST from the installed package: (images (N,28,28) uint8, labels (N,) int64), duplicates removed.

    About 3% of the images are exact copies; keeping the first of each avoids train/val leakage.
    """
    try:
        root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError:
        raise DataError("the embedded data set needs animal-mnist: pip install --no-deps animal-mnist==0.4 "
                        "(scripts/install.sh does it)") from None
    with gzip.open(str(root / "animal_data_version_3.gz"), "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(str(root / "animal_label_version_3.gz"), "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    if images.shape[1:] != (EMBEDDED_SIZE, EMBEDDED_SIZE) or len(images) != len(labels):
        raise DataError(f"unexpected embedded data shapes {images.shape} / {labels.shape}")
    seen, keep = set(), []
    for i, img in enumerate(images):
        digest = hashlib.sha1(img.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return images[keep], labels[keep]


class ArrayImages(Dataset):
    """uint8 grey images -> RGB PIL images through a transform (so the ImageNet pipeline applies unchanged)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def embedded_splits(train_tf, val_tf, val_fraction: float, seed: int) -> DataSplits:
    images, labels = load_embedded_arrays()
    order = np.random.RandomState(seed).permutation(len(images))  # labels are sorted by class: shuffle
    n_val = int(round(val_fraction * len(order)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return DataSplits(ArrayImages(images[train_idx], labels[train_idx], train_tf),
                      ArrayImages(images[val_idx], labels[val_idx], val_tf),
                      len(EMBEDDED_CLASSES), EMBEDDED_CLASSES)


class SyntheticImages(Dataset):
    """Deterministic random images, label = index % classes, with a class-dependent brightness so a model can
    learn something (smoke tests only). Already normalised tensors: no transform."""

    def __init__(self, length: int, num_classes: int, img_size: int, in_chans: int, seed: int):
        self.length, self.num_classes = length, num_classes
        self.shape, self.seed = (in_chans, img_size, img_size), seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        target = i % self.num_classes
        img = torch.randn(self.shape, generator=g) + (target / max(1, self.num_classes - 1) - 0.5)
        return img, target


def build_transform(is_train: bool, args) -> Callable:
    """The DeiT pipeline on timm's API: RandAugment, colour jitter, random erasing for training; resize to
    input/crop_ratio + centre crop for evaluation."""
    from timm.data import create_transform
    if is_train:
        return create_transform(
            input_size=args.input_size, is_training=True, scale=tuple(args.scale), hflip=args.hflip,
            color_jitter=args.color_jitter, auto_augment=None if args.aa in ("", "none") else args.aa,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return create_transform(input_size=args.input_size, is_training=False, interpolation="bicubic",
                            crop_pct=args.eval_crop_ratio, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def build_datasets(args, training: bool = True) -> DataSplits:
    """The train and val splits of --data-set. training=False (--eval): the val split is what matters; an
    ImageNet folder needs no train/ then (splits.train is None)."""
    name = args.data_set
    if name == "SYNTHETIC":
        classes = args.nb_classes or 10
        return DataSplits(
            SyntheticImages(args.synthetic_size, classes, args.input_size, args.in_chans, args.seed),
            SyntheticImages(max(1, args.synthetic_size // 4), classes, args.input_size, args.in_chans,
                            args.seed + 1), classes, tuple(str(c) for c in range(classes)))
    if args.in_chans != 3:
        raise DataError(f"--data-set {name} gives RGB images: --in-chans must be 3, got {args.in_chans}")
    train_tf, val_tf = build_transform(True, args), build_transform(False, args)
    if name == "EMBEDDED":
        return embedded_splits(train_tf, val_tf, args.val_fraction, args.data_seed)
    if not args.data_path:
        raise DataError(f"--data-set {name} needs --data-path")
    if name == "IMNET":
        return _split_folders(args.data_path, train_tf, val_tf, training)
    if name == "IMAGEFOLDER":
        return _plain_folder(args.data_path, train_tf, val_tf, args.val_fraction, args.data_seed)
    raise DataError(f"unknown --data-set {name!r}; choose from {DATA_SETS}")


class SeededSampler(torch.utils.data.Sampler):
    """Single-process shuffling seeded by (seed, epoch): the same order whether or not the run was resumed."""

    def __init__(self, dataset, seed: int):
        self.n, self.seed, self.epoch = len(dataset), seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def build_loaders(splits: DataSplits, args, world_size: int, rank: int, training: bool = True):
    """Train loader (repeated-augmentation sampler under DDP if asked) and a val loader split across ranks
    (distributed evaluation) unless --no-dist-eval. training=False (--eval): no train loader (None), and
    none of the training set's checks."""
    from timm.data.distributed_sampler import OrderedDistributedSampler, RepeatAugSampler
    if not training:
        train_sampler = None
    elif world_size > 1:
        if args.repeated_aug:
            train_sampler = RepeatAugSampler(splits.train, num_replicas=world_size, rank=rank, shuffle=True)
        else:
            train_sampler = DistributedSampler(splits.train, world_size, rank, shuffle=True, seed=args.seed)
    else:
        train_sampler = SeededSampler(splits.train, args.seed)
    if world_size > 1 and args.dist_eval:
        # OrderedDistributedSampler pads to a multiple of world_size; evaluate(valid_samples=) drops the padding.
        val_sampler = OrderedDistributedSampler(splits.val, num_replicas=world_size, rank=rank)
    else:
        val_sampler = SequentialSampler(splits.val)
    # No persistent workers: fresh workers per epoch take their seeds from the (per-epoch reseeded) global RNG,
    # which is what makes --resume exact.
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem)
    val_loader = DataLoader(splits.val, batch_size=args.eval_batch_size or int(1.5 * args.batch_size),
                            sampler=val_sampler, drop_last=False, **common)
    if not training:
        return None, val_loader
    train_loader = DataLoader(splits.train, batch_size=args.batch_size, sampler=train_sampler, drop_last=True,
                              worker_init_fn=_seed_worker, **common)
    if len(train_loader) == 0:
        raise DataError(f"the training set has {len(splits.train)} images per epoch, fewer than one batch of "
                        f"{args.batch_size} per process: lower --batch-size")
    return train_loader, val_loader


def _seed_worker(worker_id: int):
    # numpy in workers is otherwise seeded identically on every epoch (timm's RandAugment uses `random`,
    # which torch seeds per worker from the loader's base seed).
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)


def describe(splits: DataSplits) -> str:
    train = f"{len(splits.train)} train / " if splits.train is not None else ""
    return f"{train}{len(splits.val)} val images, {splits.num_classes} classes"


def set_epoch(loader: DataLoader, epoch: int):
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
