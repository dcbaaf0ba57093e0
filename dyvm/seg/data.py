"""Segmentation data: ADE20K, any folder of image/mask pairs, and embedded scenes made from Animal-MNIST.

Layouts:
  ADE20K  --data-path ADEChallengeData2016 (or its parent): images/{training,validation}/*.jpg and
          annotations/{training,validation}/*.png; label 0 ("other") is ignored, classes 1..150 become 0..149.
  FOLDER  --data-path DIR: DIR/{train,val}/images/* and DIR/{train,val}/masks/* paired by file stem; masks hold
          class indices 0..K-1 (255 = ignore), K given by --nb-classes.
  SCENES  (the default, nothing to download): scenes composed on the fly from the installed animal-mnist
          silhouettes: a smooth random background and a few animals, each pasted in a random colour, size,
          position and orientation; every pixel is labelled with its animal's class (1..10, the last animal
          pasted wins) or background (0). Scene i of a split is a pure function of (seed, split, i). The
          silhouettes are split first (duplicates removed, seeded), so validation scenes are made only of
          images that training never sees.

Augmentation (training, torchvision.transforms.v2 on the image and its mask together, as mmseg's ADE20K
pipeline): resize to the base scale times a random ratio (keeping the aspect ratio), random crop (retried so that
one class covers at most cat_max_ratio of the crop), padding to the crop size (mask padding 255 = ignored),
horizontal flip, photometric distortion, normalisation. Evaluation: resize to the base scale keeping the aspect
ratio; the mask stays at its original size (metrics are computed there).

Augmentation randomness is drawn from a generator seeded by (seed, epoch, index): a resumed run sees exactly the
crops a straight run would, whatever the number of loader workers.
"""
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dyvm.data import EMBEDDED_CLASSES, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DataError, \
    UnreadableImageError, load_embedded_arrays, read_image

SEG_DATA_SETS = ("SCENES", "ADE20K", "FOLDER")
IGNORE_INDEX = 255
ADE20K_NUM_CLASSES = 150


@dataclass
class SegSplits:
    """train / val datasets of raw (PIL image, (H, W) uint8 mask) pairs, before any transform."""
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: tuple
    base_scale: tuple  # (long side, short side) the images are resized to before the random ratio / for eval


# ---- embedded scenes -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneSpec:
    size: int = 64  # scenes are size x size pixels
    animals: tuple = (2, 4)  # inclusive range of animals per scene
    animal_scale: tuple = (0.35, 0.6)  # animal side as a fraction of the scene side


def compose_scene(rng: np.random.Generator, silhouettes: np.ndarray, labels: np.ndarray, spec: SceneSpec):
    """-> (image (S, S, 3) uint8, mask (S, S) uint8, placements [(class, top, left, side, silhouette, mirrored)]).

    The background is a smooth field between four random dark-to-mid colours plus noise; each animal is a
    silhouette scaled to `side` pixels, maybe mirrored, pasted at (top, left) in a random bright colour through
    its grey levels as alpha; its pixels (alpha > 0.5) get label class + 1 and cover earlier animals.
    """
    S = spec.size
    corners = rng.uniform(0, 140, size=(2, 2, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, S, dtype=np.float32)
    top = corners[0, 0] * (1 - t)[:, None] + corners[0, 1] * t[:, None]  # (S, 3) along x
    bottom = corners[1, 0] * (1 - t)[:, None] + corners[1, 1] * t[:, None]
    image = top[None] * (1 - t)[:, None, None] + bottom[None] * t[:, None, None]  # (S, S, 3)
    image = image + rng.normal(0, 8, size=image.shape).astype(np.float32)
    mask = np.zeros((S, S), dtype=np.uint8)
    placements = []
    for _ in range(int(rng.integers(spec.animals[0], spec.animals[1] + 1))):
        j = int(rng.integers(len(silhouettes)))
        side = max(4, int(round(rng.uniform(*spec.animal_scale) * S)))
        sil = Image.fromarray(silhouettes[j]).resize((side, side), Image.BILINEAR)
        alpha = np.asarray(sil, dtype=np.float32) / 255.0
        mirrored = bool(rng.random() < 0.5)
        if mirrored:
            alpha = alpha[:, ::-1]
        y, x = (int(v) for v in rng.integers(-side // 4, S - 3 * side // 4 + 1, size=2))
        colour = rng.uniform(120, 255, size=3).astype(np.float32)
        ys, xs = slice(max(y, 0), min(y + side, S)), slice(max(x, 0), min(x + side, S))
        a = alpha[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x, None]
        image[ys, xs] = image[ys, xs] * (1 - a) + colour * a
        mask[ys, xs][a[..., 0] > 0.5] = labels[j] + 1
        placements.append((int(labels[j]), y, x, side, j, mirrored))
    return np.clip(image, 0, 255).astype(np.uint8), mask, placements


def split_silhouettes(val_fraction: float, seed: int):
    """Animal-MNIST (duplicates removed) -> ((train images, labels), (val images, labels)), disjoint, seeded."""
    images, labels = load_embedded_arrays()
    order = np.random.RandomState(seed).permutation(len(images))
    n_val = int(round(val_fraction * len(order)))
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


class SceneDataset(Dataset):
    """`length` scenes from a pool of silhouettes; scene i = compose_scene(rng(seed, stream, i))."""

    def __init__(self, silhouettes: np.ndarray, labels: np.ndarray, length: int, spec: SceneSpec, seed: int,
                 stream: int):
        self.silhouettes, self.labels, self.length, self.spec = silhouettes, labels, length, spec
        self.seed, self.stream = seed, stream

    def __len__(self):
        return self.length

    def scene(self, i: int):
        return compose_scene(np.random.default_rng([self.seed, self.stream, i]), self.silhouettes, self.labels,
                             self.spec)

    def __getitem__(self, i):
        image, mask, _ = self.scene(i)
        return Image.fromarray(image), mask


def select_classes(images: np.ndarray, labels: np.ndarray, names: Sequence[str]):
    """Only the silhouettes of the named animals, relabelled 0..len(names)-1 in the order given."""
    unknown = [n for n in names if n not in EMBEDDED_CLASSES]
    if unknown or len(set(names)) != len(names):
        raise DataError(f"--scene-classes {list(names)}: give distinct names among {list(EMBEDDED_CLASSES)}")
    old = [EMBEDDED_CLASSES.index(n) for n in names]
    keep = np.isin(labels, old)
    remap = np.full(len(EMBEDDED_CLASSES), -1)
    remap[old] = np.arange(len(old))
    return images[keep], remap[labels[keep]]


def scene_splits(spec: SceneSpec, train_scenes: int, val_scenes: int, val_fraction: float, seed: int,
                 classes: Sequence[str] = ()) -> SegSplits:
    """Scenes of every animal class, or of the `classes` named (labels 1..len(classes) in that order)."""
    (train_x, train_y), (val_x, val_y) = split_silhouettes(val_fraction, seed)
    names = EMBEDDED_CLASSES
    if classes:
        (train_x, train_y), (val_x, val_y) = select_classes(train_x, train_y, classes), select_classes(val_x, val_y,
                                                                                                      classes)
        names = tuple(classes)
    return SegSplits(SceneDataset(train_x, train_y, train_scenes, spec, seed, stream=0),
                     SceneDataset(val_x, val_y, val_scenes, spec, seed, stream=1),
                     len(names) + 1, ("background",) + names, (spec.size, spec.size))


# ---- folders: ADE20K and any image/mask pairs -------------------------------------------------------------------

def read_mask(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            mask = Image.open(f)
            mask.load()
    except Exception as e:  # noqa: BLE001  (PIL raises many types for broken files)
        raise UnreadableImageError(f"cannot read mask {path}: {type(e).__name__}: {e}") from None
    if mask.mode not in ("L", "P", "I;16", "I"):
        raise DataError(f"mask {path} has mode {mask.mode}: expected a single-channel image of class indices")
    return np.asarray(mask).astype(np.uint8)


class PairedFolder(Dataset):
    """Images and masks paired by file stem. reduce_zero_label: label 0 -> ignored, k -> k - 1 (ADE20K)."""

    def __init__(self, image_dir: str, mask_dir: str, reduce_zero_label: bool):
        for d in (image_dir, mask_dir):
            if not os.path.isdir(d):
                raise DataError(f"folder {d} does not exist")
        masks = {os.path.splitext(f)[0]: f for f in os.listdir(mask_dir) if f.lower().endswith(".png")}
        images = sorted(f for f in os.listdir(image_dir) if f.endswith(IMAGE_EXTENSIONS))
        unpaired = [f for f in images if os.path.splitext(f)[0] not in masks]
        if unpaired:
            raise DataError(f"{len(unpaired)} image(s) in {image_dir} have no .png mask of the same name in "
                            f"{mask_dir} (e.g. {unpaired[0]})")
        if not images:
            raise DataError(f"no images in {image_dir}")
        self.pairs = [(os.path.join(image_dir, f), os.path.join(mask_dir, masks[os.path.splitext(f)[0]]))
                      for f in images]
        self.reduce_zero_label = reduce_zero_label

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image_path, mask_path = self.pairs[i]
        image, mask = read_image(image_path), read_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image "
                            f"{image.width}x{image.height}")
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE_INDEX, mask.astype(np.int64) - 1).astype(np.uint8)
            mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
        return image, mask


def ade20k_splits(data_path: str, base_scale: tuple) -> SegSplits:
    root = data_path
    if os.path.isdir(os.path.join(data_path, "ADEChallengeData2016")):
        root = os.path.join(data_path, "ADEChallengeData2016")
    if not os.path.isdir(os.path.join(root, "images")) or not os.path.isdir(os.path.join(root, "annotations")):
        raise DataError(f"--data-path {data_path} is not ADE20K: expected ADEChallengeData2016/images/"
                        "{training,validation} and annotations/{training,validation}")
    split = lambda name: PairedFolder(os.path.join(root, "images", name),  # noqa: E731
                                      os.path.join(root, "annotations", name), reduce_zero_label=True)
    return SegSplits(split("training"), split("validation"), ADE20K_NUM_CLASSES,
                     tuple(str(c) for c in range(ADE20K_NUM_CLASSES)), base_scale)


def folder_splits(data_path: str, num_classes: Optional[int], base_scale: tuple) -> SegSplits:
    if not num_classes:
        raise DataError("--data-set FOLDER needs --nb-classes (masks hold class indices 0..K-1, 255 = ignore)")
    split = lambda name: PairedFolder(os.path.join(data_path, name, "images"),  # noqa: E731
                                      os.path.join(data_path, name, "masks"), reduce_zero_label=False)
    return SegSplits(split("train"), split("val"), num_classes, tuple(str(c) for c in range(num_classes)),
                     base_scale)


# ---- transforms ----------------------------------------------------------------------------------------------

def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple:
    """mmseg's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class RandomRatioResize(v2.Transform):
    """Resize (keeping the aspect ratio) to base_scale x a ratio drawn uniformly from ratio_range."""

    def __init__(self, base_scale: Sequence[int], ratio_range: Sequence[float]):
        super().__init__()
        self.base_scale, self.ratio_range = tuple(base_scale), tuple(ratio_range)

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        return {"size": list(rescale_size(h, w, [int(s * ratio) for s in self.base_scale]))}

    def transform(self, inpt, params):
        mode = TF.InterpolationMode.NEAREST if isinstance(inpt, tv_tensors.Mask) else TF.InterpolationMode.BILINEAR
        return TF.resize(inpt, params["size"], interpolation=mode, antialias=not isinstance(inpt, tv_tensors.Mask))


class CropWithCategoryLimit(v2.Transform):
    """Random crop of at most crop x crop, retried (up to 10 times) while one class covers more than
    cat_max_ratio of the crop's labelled pixels; then padded to crop x crop (image 0, mask ignored)."""

    def __init__(self, crop: int, cat_max_ratio: float = 0.75, tries: int = 10):
        super().__init__()
        self.crop, self.cat_max_ratio, self.tries = crop, cat_max_ratio, tries

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        mask = next(x for x in flat_inputs if isinstance(x, tv_tensors.Mask))
        for _ in range(self.tries):
            top = int(torch.randint(max(h - self.crop, 0) + 1, ()))
            left = int(torch.randint(max(w - self.crop, 0) + 1, ()))
            if self.cat_max_ratio >= 1:
                break
            window = mask[..., top:top + self.crop, left:left + self.crop]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten().long())
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return {"top": top, "left": left, "height": min(self.crop, h - top), "width": min(self.crop, w - left),
                "pad": [0, 0, self.crop - min(self.crop, w - left), self.crop - min(self.crop, h - top)]}

    def transform(self, inpt, params):
        out = TF.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return TF.pad(out, params["pad"], fill=fill) if any(params["pad"]) else out


class PhotometricDistortion(v2.Transform):
    """Close to mmseg's PhotoMetricDistortion, on float images in [0, 1]: each with probability 1/2, brightness
    shifted by up to 32/255, contrast scaled by 0.5..1.5 (before or after the colour changes), saturation scaled by
    0.5..1.5, hue rotated by up to 0.1 of the circle. Masks pass through."""

    _transformed_types = (tv_tensors.Image,)

    def make_params(self, flat_inputs):
        u = lambda a, b: float(torch.empty(()).uniform_(a, b))  # noqa: E731
        on = (torch.rand(5) < 0.5).tolist()
        return {"brightness": u(-32 / 255, 32 / 255) if on[0] else 0.0, "contrast": u(0.5, 1.5) if on[1] else 1.0,
                "contrast_first": on[2], "saturation": u(0.5, 1.5) if on[3] else 1.0,
                "hue": u(-0.1, 0.1) if on[4] else 0.0}

    def transform(self, inpt, params):
        x = (inpt + params["brightness"]).clamp(0, 1)
        if params["contrast_first"]:
            x = (x * params["contrast"]).clamp(0, 1)
        x = TF.adjust_saturation(x, params["saturation"])
        x = TF.adjust_hue(x, params["hue"])
        if not params["contrast_first"]:
            x = (x * params["contrast"]).clamp(0, 1)
        return tv_tensors.Image(x)


def _to_tv(image: Image.Image, mask: np.ndarray):
    return TF.pil_to_tensor(image).as_subclass(tv_tensors.Image), tv_tensors.Mask(torch.from_numpy(mask)[None])


_FLOAT = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


class TrainTransform:
    def __init__(self, base_scale: Sequence[int], crop: int, ratio_range: Sequence[float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, hflip: float = 0.5, photometric: bool = True):
        steps = [RandomRatioResize(base_scale, ratio_range), CropWithCategoryLimit(crop, cat_max_ratio),
                 v2.RandomHorizontalFlip(hflip), _FLOAT]
        if photometric:
            steps.append(PhotometricDistortion())
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
        self.pipeline = v2.Compose(steps)

    def __call__(self, image, mask):
        image, mask = self.pipeline(*_to_tv(image, mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0].long()


class EvalTransform:
    """Resize the image to the base scale (aspect kept) and normalise; the mask keeps its original size."""

    def __init__(self, base_scale: Sequence[int]):
        self.base_scale = tuple(base_scale)
        self.normalize = v2.Compose([_FLOAT, v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, image, mask):
        image, mask = _to_tv(image, mask)
        size = rescale_size(image.shape[1], image.shape[2], self.base_scale)
        image = self.normalize(TF.resize(image, list(size), antialias=True))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0].long()


class Transformed(Dataset):
    """A split with its transform; key = epoch * len + index (see EpochSampler): the augmentation of an item is
    drawn from a generator seeded by (seed, key), so it is the same in a resumed run and in any worker."""

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: int):
        image, mask = self.dataset[key % len(self.dataset)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + key)
            return self.transform(image, mask)


# ---- splits and loaders ----------------------------------------------------------------------------------------

class EpochSampler(torch.utils.data.Sampler):
    """An endless stream of keys epoch * n + index for this rank: each epoch a permutation seeded by (seed,
    epoch), dealt round-robin to the ranks (the tail that does not divide is dropped). start: how many of this
    rank's samples were already consumed (resume), skipped arithmetically."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start
        self.per_rank = n // world_size
        if self.per_rank == 0:
            raise DataError(f"the training set has {n} items, fewer than the {world_size} processes")

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1009 + epoch)
            mine = torch.randperm(self.n, generator=g)[self.rank::self.world_size][:self.per_rank]
            for index in mine[offset:].tolist():
                yield epoch * self.n + index
            epoch, offset = epoch + 1, 0


def build_seg_splits(args) -> SegSplits:
    """The splits a command line asks for (dyvm.seg.config: --data-set, --data-path, scene options)."""
    if args.data_set == "SCENES":
        spec = SceneSpec(args.scene_size, tuple(args.animals_per_scene), tuple(args.animal_scale))
        splits = scene_splits(spec, args.train_scenes, args.val_scenes, args.val_fraction, args.data_seed,
                              args.scene_classes or ())
    else:
        if not args.data_path:
            raise DataError(f"--data-set {args.data_set} needs --data-path")
        base = tuple(args.img_scale) if args.img_scale else (2048, 512)
        if args.data_set == "ADE20K":
            splits = ade20k_splits(args.data_path, base)
        elif args.data_set == "FOLDER":
            splits = folder_splits(args.data_path, args.nb_classes, base)
        else:
            raise DataError(f"unknown --data-set {args.data_set!r}; choose from {SEG_DATA_SETS}")
    if args.img_scale:
        splits.base_scale = tuple(args.img_scale)
    return splits


def collate_train(batch):
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)


def collate_eval(batch):
    """Evaluation images may differ in size: lists, grouped into stacks by dyvm.seg.engine."""
    images, masks = zip(*batch)
    return list(images), list(masks)
