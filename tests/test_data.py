"""Data sets: the embedded set (deduplicated, seeded split), folders, synthetic, and one-line errors."""
import hashlib
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dyvm.data import (DataError, SyntheticImages, build_datasets, build_loaders, embedded_splits,
                       load_embedded_arrays)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as harness  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def args_for(**kw):
    from dyvm.config import parse_args
    args = parse_args(["--input-size", "32", "--num_workers", "0", "--no-progress"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_embedded_is_deduplicated_and_split_without_leakage():
    images, labels = load_embedded_arrays()
    assert images.shape[1:] == (28, 28) and images.dtype == np.uint8
    digests = {hashlib.sha1(im.tobytes()).digest() for im in images}
    assert len(digests) == len(images) and 9000 < len(images) < 10000  # ~3% duplicates removed
    splits = embedded_splits(None, None, 0.15, seed=0)
    assert splits.num_classes == 10 and len(splits.train) + len(splits.val) == len(images)
    train = {hashlib.sha1(im.tobytes()).digest() for im in splits.train.images}
    val = {hashlib.sha1(im.tobytes()).digest() for im in splits.val.images}
    assert not train & val
    assert len(np.unique(splits.val.labels)) == 10  # shuffled before splitting (labels come sorted by class)
    again = embedded_splits(None, None, 0.15, seed=0)
    assert np.array_equal(again.val.labels, splits.val.labels)
    other = embedded_splits(None, None, 0.15, seed=1)
    assert not np.array_equal(other.val.labels, splits.val.labels)


def test_embedded_through_the_imagenet_pipeline():
    args = args_for(data_set="EMBEDDED", input_size=28, aa="none", reprob=0.0, scale=(0.75, 1.0))
    splits = build_datasets(args)
    x, y = splits.train[0]
    assert x.shape == (3, 28, 28) and 0 <= y < 10
    x, _ = splits.val[0]
    assert x.shape == (3, 28, 28)


def _write_folder(root, classes=("a", "b"), per_class=3, size=20):
    rng = np.random.RandomState(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagenet_layout_and_plain_folder(tmp_path):
    _write_folder(tmp_path / "in" / "train")
    _write_folder(tmp_path / "in" / "val", per_class=1)
    splits = build_datasets(args_for(data_set="IMNET", data_path=str(tmp_path / "in")))
    assert (len(splits.train), len(splits.val), splits.num_classes) == (6, 2, 2)
    assert splits.train[0][0].shape == (3, 32, 32)
    _write_folder(tmp_path / "plain", classes=("x", "y", "z"), per_class=4)
    splits = build_datasets(args_for(data_set="IMAGEFOLDER", data_path=str(tmp_path / "plain"), val_fraction=0.25))
    assert (len(splits.train), len(splits.val), splits.num_classes) == (9, 3, 3)


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"),
    ("no_val", "has no val/ folder"),
    ("empty_class", "malformed image folder"),
    ("class_mismatch", "different classes"),
])
def test_malformed_data_paths(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        _write_folder(root / "train")
    if layout == "empty_class":
        os.makedirs(root / "val" / "a")
    if layout == "class_mismatch":
        _write_folder(root / "val", classes=("a", "c"), per_class=1)
    with pytest.raises(DataError, match=message) as info:
        build_datasets(args_for(data_set="IMNET", data_path=str(root)))
    assert "\n" not in str(info.value)


def test_unreadable_image_is_a_one_line_error_from_main(tmp_path, capsys):
    _write_folder(tmp_path / "d" / "train", per_class=4)
    _write_folder(tmp_path / "d" / "val", per_class=1)
    (tmp_path / "d" / "train" / "a" / "1.png").write_bytes(b"this is not a png")
    rc = harness.main(["--model", "vim_tiny", "--data-set", "IMNET", "--data-path", str(tmp_path / "d"),
                       "--input-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "16",
                       "--batch-size", "8", "--epochs", "1", "--num_workers", "1", "--no-progress",
                       "--aa", "none", "--mixup", "0", "--cutmix", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and err.startswith("error: cannot read image ") and "1.png" in err, err


def test_synthetic_is_deterministic():
    ds = SyntheticImages(10, 5, 16, 3, seed=0)
    assert torch.equal(ds[3][0], ds[3][0]) and ds[3][1] == 3 and ds[8][1] == 3
    assert not torch.equal(ds[3][0], SyntheticImages(10, 5, 16, 3, seed=1)[3][0])


def test_batch_larger_than_the_data_is_reported():
    args = args_for(data_set="SYNTHETIC", synthetic_size=4, batch_size=8)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loaders(build_datasets(args), args, world_size=1, rank=0)


def test_distributed_eval_split_counts_every_image_once():
    """OrderedDistributedSampler pads the last rank; main.valid_samples keeps exactly the real images."""
    from timm.data.distributed_sampler import OrderedDistributedSampler
    for n, world in [(10, 3), (9, 3), (7, 2), (1, 2), (5, 4)]:
        seen = []
        for r in range(world):
            indices = list(OrderedDistributedSampler(range(n), num_replicas=world, rank=r))
            seen += indices[:harness.valid_samples(n, world, r, True)]
        assert sorted(seen) == list(range(n))
    assert harness.valid_samples(10, 1, 0, True) is None


def test_evaluation_needs_only_the_validation_folder(tmp_path):
    """--eval on the ImageNet layout reads val/ alone: no train/ needed, no training-set checks."""
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200 if c == "a" else 20, 90, 90)).save(tmp_path / "val" / c / "0.png")
    args = args_for(data_set="IMNET", data_path=str(tmp_path), batch_size=64)
    with pytest.raises(DataError, match="has no train/ folder"):
        build_datasets(args)
    splits = build_datasets(args, training=False)
    assert splits.train is None and splits.num_classes == 2 and len(splits.val) == 2
    train_loader, val_loader = build_loaders(splits, args, 1, 0, training=False)
    assert train_loader is None and next(iter(val_loader))[0].shape == (2, 3, 32, 32)
