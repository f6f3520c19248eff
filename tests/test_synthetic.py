"""The built-in synthetic expression set."""

import numpy as np
import pytest
import torch

from fermodel.data import FER2013_CLASSES, make_synthetic
from fermodel.data.synthetic import expression_params


@pytest.fixture(scope="module")
def small():
    return make_synthetic(num_subjects=12, images_per_class=3, seed=5)


def test_shapes_types_and_class_balance(small):
    assert small.images.dtype == torch.uint8 and small.images.shape == (12 * 7 * 3, 1, 48, 48)
    assert small.classes == FER2013_CLASSES
    assert set(small.class_counts().values()) == {36}
    assert small.images.float().std() > 20  # faces, not flat frames


def test_deterministic_per_seed(small):
    again = make_synthetic(num_subjects=12, images_per_class=3, seed=5)
    other = make_synthetic(num_subjects=12, images_per_class=3, seed=6)
    assert torch.equal(small.images, again.images) and torch.equal(small.labels, again.labels)
    assert (small.split == again.split).all() and (small.subjects == again.subjects).all()
    assert not torch.equal(small.images, other.images)


def test_splits_are_subject_disjoint_and_every_subject_shows_every_class(small):
    owners = {s: set(small.split[small.subjects == s]) for s in np.unique(small.subjects)}
    assert all(len(parts) == 1 for parts in owners.values())
    assert {p for parts in owners.values() for p in parts} == {"train", "val", "test"}
    for s in np.unique(small.subjects):
        assert set(small.labels[torch.from_numpy(small.subjects == s)].tolist()) == set(range(7))


def test_images_of_one_class_vary_and_classes_differ_on_average():
    data = make_synthetic(num_subjects=30, images_per_class=4, seed=0)
    x = data.images.float()[:, 0]
    means = torch.stack([x[data.labels == c].mean(0) for c in range(7)])
    within = torch.stack([x[data.labels == c].std(0).mean() for c in range(7)]).mean()
    between = torch.cdist(means.flatten(1), means.flatten(1))
    assert within > 20  # nuisance keeps the images of one class far from identical
    # mouth, brows and eyes move: happy and surprise differ from neutral on average
    neutral, happy, surprise = (FER2013_CLASSES.index(c) for c in ("neutral", "happy", "surprise"))
    assert between[neutral, happy] > 50 and between[neutral, surprise] > 50


def test_zero_intensity_is_neutral_for_every_class():
    names = ["angry", "happy", "surprise", "neutral"]
    torch.testing.assert_close(
        expression_params(names, torch.zeros(4)), expression_params(["neutral"] * 4, torch.zeros(4))
    )
    with pytest.raises(ValueError, match="no synthetic expression for \\['smug'\\]"):
        expression_params(["smug"], torch.ones(1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_subjects": 2}, "num_subjects must be at least 3"),
        ({"images_per_class": 0}, "images_per_class must be at least 1"),
        ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions must be three"),
        ({"difficulty": 0}, r"difficulty must be in \(0, 1\]"),
        ({"difficulty": 1.5}, r"difficulty must be in \(0, 1\]"),
        (
            {"num_subjects": 3, "split_fractions": (0.0, 0.5, 0.5)},
            r"give 2 val and 2 test subjects, leaving -1 for train",
        ),
        (
            {"num_subjects": 4, "split_fractions": (0.1, 0.45, 0.45)},
            r"give 2 val and 2 test subjects, leaving 0 for train",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(**kwargs)
