"""Segmentation data: the embedded scene generator, folder layouts, joint image/mask augmentation, the
resumable sampler, and the metrics against a hand-computed confusion matrix."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dyvm.data import DataError
from dyvm.seg.data import (IGNORE_INDEX, EpochSampler, EvalTransform, PairedFolder, SceneDataset, SceneSpec,
                           TrainTransform, Transformed, ade20k_splits, compose_scene, rescale_size, scene_splits,
                           split_silhouettes)
from dyvm.seg.metrics import confusion_matrix, segmentation_metrics


@pytest.fixture(scope="module")
def silhouettes():
    return split_silhouettes(val_fraction=0.15, seed=0)


def test_scenes_are_deterministic_per_seed_and_index(silhouettes):
    (x, y), _ = silhouettes
    a = SceneDataset(x, y, 10, SceneSpec(), seed=3, stream=0)
    b = SceneDataset(x, y, 10, SceneSpec(), seed=3, stream=0)
    for i in (0, 7):
        (ia, ma, pa), (ib, mb, pb) = a.scene(i), b.scene(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb) and pa == pb
    assert not np.array_equal(a.scene(0)[0], a.scene(1)[0])
    assert not np.array_equal(a.scene(0)[0], SceneDataset(x, y, 10, SceneSpec(), seed=4, stream=0).scene(0)[0])


def test_scene_pixels_are_labelled_with_their_animal(silhouettes):
    """Rebuild each mask from the recorded placements: a pixel gets the class of the last animal whose scaled
    silhouette covers it (grey level above half), background elsewhere; animal pixels are brighter."""
    (x, y), _ = silhouettes
    spec = SceneSpec(size=48, animals=(3, 3))
    for i in range(5):
        image, mask, placements = compose_scene(np.random.default_rng([0, 0, i]), x, y, spec)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and mask.shape == (48, 48)
        assert len(placements) == 3
        expected = np.zeros((48 + 96, 48 + 96), np.uint8)  # margins: animals may stick out of the scene
        for cls, top, left, side, j, mirrored in placements:
            assert cls == y[j]
            sil = np.asarray(Image.fromarray(x[j]).resize((side, side), Image.BILINEAR)) > 127.5
            sil = sil[:, ::-1] if mirrored else sil
            window = expected[48 + top:48 + top + side, 48 + left:48 + left + side]
            window[sil] = cls + 1
        assert np.array_equal(mask, expected[48:96, 48:96])
        assert (mask > 0).sum() > 50
        # the pasted colour is bright (>= 120 per channel before noise-free blending) against a darker field
        assert image[mask > 0].astype(float).mean() > image[mask == 0].astype(float).mean() + 30


def test_scenes_of_chosen_classes():
    splits = scene_splits(SceneSpec(size=32), 4, 4, 0.15, 0, classes=("giraffe", "bird"))
    assert splits.class_names == ("background", "giraffe", "bird") and splits.num_classes == 3
    labels = set()
    for i in range(4):
        _, mask, placements = splits.train.scene(i)
        labels |= set(np.unique(mask).tolist())
        for cls, *_ in placements:
            assert cls in (0, 1)
    assert labels <= {0, 1, 2}
    with pytest.raises(DataError, match="distinct names"):
        scene_splits(SceneSpec(size=32), 4, 4, 0.15, 0, classes=("unicorn",))


def test_validation_silhouettes_are_kept_apart(silhouettes):
    (tx, _), (vx, _) = silhouettes
    train = {a.tobytes() for a in tx}
    assert len(vx) > 1000 and not any(a.tobytes() in train for a in vx)


def test_train_transform_moves_image_and_mask_together(silhouettes):
    (x, y), _ = silhouettes
    scenes = SceneDataset(x, y, 20, SceneSpec(size=32), seed=0, stream=0)
    data = Transformed(scenes, TrainTransform((32, 32), crop=24, ratio_range=(0.5, 2.0), photometric=False), seed=1)
    for key in range(8):
        image, mask = data[key]
        assert image.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.int64
        padded = mask == IGNORE_INDEX
        # padding: image zero (before normalisation: the mean's negative after it), mask ignored, same pixels
        if padded.any():
            assert torch.allclose(image[:, padded], image[:, padded][:, :1])
        assert set(mask.unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}
    a, b = data[3], data[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seeded by (seed, key)
    # a flip is applied to both: with photometric off and no resize, flipping the raw pair gives the same pair
    flip_only = Transformed(scenes, TrainTransform((32, 32), crop=32, ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                                   hflip=1.0, photometric=False), seed=0)
    plain = Transformed(scenes, EvalTransform((32, 32)), seed=0)
    (fi, fm), (pi, pm) = flip_only[2], plain[2]
    assert torch.equal(fm, pm.flip(-1)) and torch.allclose(fi, pi.flip(-1), atol=1e-6)


def test_eval_transform_rescales_like_mmseg():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert rescale_size(300, 3000, (2048, 512)) == (205, 2048)
    image, mask = EvalTransform((2048, 512))(Image.new("RGB", (500, 375)), np.zeros((375, 500), np.uint8))
    assert image.shape == (3, 512, 683) and mask.shape == (375, 500)


def test_sampler_resumes_where_it_stopped():
    full = iter(EpochSampler(10, seed=2, rank=1, world_size=2))
    stream = [next(full) for _ in range(17)]
    resumed = iter(EpochSampler(10, seed=2, rank=1, world_size=2, start=7))
    assert [next(resumed) for _ in range(10)] == stream[7:]
    assert sorted(k % 10 for k in stream[:5]) == sorted(set(k % 10 for k in stream[:5]))  # no repeats in an epoch
    other = iter(EpochSampler(10, seed=2, rank=0, world_size=2))
    assert not set(next(other) for _ in range(5)) & set(stream[:5])  # ranks see disjoint halves


def _write_pair(folder, name, size, labels):
    (folder / "img").mkdir(exist_ok=True)
    (folder / "ann").mkdir(exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(folder / "img" / f"{name}.jpg")
    Image.fromarray(np.full(size[::-1], labels, np.uint8)).save(folder / "ann" / f"{name}.png")


def test_ade20k_labels_are_shifted_and_zero_ignored(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(root / "images" / split / "a.jpg")
        m = np.array([[0, 1, 150, 7]] * 6, np.uint8).repeat(2, axis=1)
        Image.fromarray(m).save(root / "annotations" / split / "a.png")
    splits = ade20k_splits(str(tmp_path), (2048, 512))
    assert splits.num_classes == 150
    _, mask = splits.val[0]
    assert mask[0].tolist() == [255, 255, 0, 0, 149, 149, 6, 6]


def test_folder_errors_are_one_line(tmp_path):
    _write_pair(tmp_path, "a", (4, 4), 1)
    (tmp_path / "img" / "b.jpg").write_bytes((tmp_path / "img" / "a.jpg").read_bytes())
    with pytest.raises(DataError, match="no .png mask"):
        PairedFolder(str(tmp_path / "img"), str(tmp_path / "ann"), False)
    with pytest.raises(DataError, match="does not exist"):
        PairedFolder(str(tmp_path / "nope"), str(tmp_path / "ann"), False)


def test_metrics_against_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    conf = confusion_matrix(pred, target, num_classes=4)
    # rows = true class, columns = predicted; the ignored pixel (255) is not counted
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    m = segmentation_metrics(conf)
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1), 0 / (0 + 1 - 0)]  # tp / (row + column - tp)
    acc = [1 / 2, 2 / 3, 1 / 2]  # class 3 has no ground truth: no accuracy
    assert m["mIoU"] == pytest.approx(100 * sum(iou) / 4)
    assert m["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 7)
    assert m["Acc"][3] is None and m["IoU"][3] == 0.0
    # a class neither present nor predicted has no IoU and does not count in the mean
    m5 = segmentation_metrics(confusion_matrix(pred, target, num_classes=5))
    assert m5["mIoU"] == pytest.approx(m["mIoU"]) and m5["IoU"][4] is None
    with pytest.raises(ValueError, match="label values"):
        confusion_matrix(pred, target.clamp(max=9) + 3, num_classes=4)
    assert math.isnan(segmentation_metrics(torch.zeros(3, 3, dtype=torch.long))["aAcc"])
