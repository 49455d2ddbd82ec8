"""Procedural shapes data set (quantduo/models/shapes.py): deterministic, balanced, in range, and separable enough
by the nearest-class-mean rule for that rule to check generated shapes."""
import torch

from quantduo.models.shapes import SHAPE_CLASSES, class_means, make_shapes, nearest_class_mean


def test_deterministic_balanced_in_range():
    images, labels = make_shapes(60, seed=3)
    again, _ = make_shapes(60, seed=3)
    other, _ = make_shapes(60, seed=4)
    assert images.shape == (60, 1, 12, 12) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert torch.equal(torch.bincount(labels), torch.full((len(SHAPE_CLASSES),), 10))
    assert float(images.min()) == 0.0 and 0.7 <= float(images.amax(dim=(1, 2, 3)).min()) <= 1.0
    assert make_shapes(6, size=16)[0].shape == (6, 1, 16, 16)


def test_classes_differ_in_ink():
    """A ring has less ink than a disk of the same draw, a bar less than a cross: the masks are the drawn shapes."""
    images, labels = make_shapes(600, seed=0)
    ink = torch.stack([images[labels == c].sum(dim=(1, 2, 3)).mean() for c in range(len(SHAPE_CLASSES))])
    disk, square, triangle, cross, ring, bar = ink.tolist()
    assert ring < 0.7 * disk and bar < cross < disk and triangle < square


def test_nearest_class_mean_separates_real_shapes():
    means = class_means(*make_shapes(3000, seed=0), len(SHAPE_CLASSES))
    images, labels = make_shapes(600, seed=1)
    assert torch.equal(nearest_class_mean(means, means), torch.arange(len(SHAPE_CLASSES)))
    accuracy = float((nearest_class_mean(images, means) == labels).float().mean())
    assert accuracy >= 0.8, accuracy
