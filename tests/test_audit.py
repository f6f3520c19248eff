"""The data audit finds what is planted in a synthetic set, and drop_leaked removes leaks from
the final splits: validation images with a copy in train or test, test images with a copy in
train (the whole test split kept beside)."""

import numpy as np
import pytest
import torch

from fermodel.data import audit, load_dataset, make_splits, make_synthetic
from fermodel.data.audit import content_groups, leaked
from fermodel.data.fakes import write_fer2013_csv


@pytest.fixture(scope="module")
def planted():
    """A clean set with planted faults, and the ids of what was planted."""
    data = make_synthetic(num_subjects=10, images_per_class=2, seed=3)
    assert audit(data).duplicate_groups == 0  # rendered faces with noise are all distinct
    train = np.flatnonzero(data.split == "train")
    test = np.flatnonzero(data.split == "test")
    val = np.flatnonzero(data.split == "val")
    images, labels = data.images.clone(), data.labels.clone()
    # 3 test images and 1 val image become copies of training images; one copy changes label
    leaks = [(train[0], test[0]), (train[1], test[1]), (train[2], test[2]), (train[3], val[0])]
    for src, dst in leaks:
        images[dst], labels[dst] = images[src], labels[src]
    labels[test[2]] = (labels[train[2]] + 1) % 7
    # 2 training images duplicated within train, same label
    images[train[11]] = images[train[10]]
    labels[train[11]] = labels[train[10]]
    # 2 blank images: all zeros and a flat gray with a 1-level ripple
    images[train[20]] = 0
    images[test[5]] = 128
    images[test[5], 0, 0, :5] = 129
    data.images, data.labels = images, labels
    return data, [dst for _, dst in leaks]


def test_the_audit_counts_every_planted_fault(planted):
    data, leaked_rows = planted
    report = audit(data)
    assert report.duplicate_groups == 5  # 4 leaked pairs + 1 within-train pair
    assert report.duplicate_images == 5
    assert report.cross_split == {"val": 1, "test": 3}
    assert report.within_split["train"] == 2 and report.within_split["test"] == 0
    assert report.conflicting_groups == 1
    assert report.blank == 2
    assert set(report.examples["leaked"]) == set(data.ids[leaked_rows])
    assert "3 test images have an identical copy in train (leakage)" in report.summary()


def test_drop_leaked_removes_exactly_the_planted_copies(planted, tmp_path):
    data, leaked_rows = planted
    mask = leaked(data)
    assert sorted(np.flatnonzero(mask)) == sorted(leaked_rows)
    write_fer2013_csv(data, tmp_path / "fer2013.csv")
    loaded = load_dataset("fer2013", tmp_path, drop_leaked=True)
    # the load only marks the choice; the final splits drop, the whole test split stays beside
    assert len(loaded) == len(data) and loaded.drop_leaked
    assert loaded.audit.cross_split == {"val": 1, "test": 3}  # the audit reports what was found
    splits = make_splits(loaded, "official")
    kept = set(splits.val.ids) | set(splits.test.ids)
    assert not kept & set(loaded.ids[leaked_rows])
    assert len(splits.val) == int((data.split == "val").sum()) - 1
    assert len(splits.test) == int((data.split == "test").sum()) - 3
    assert len(splits.full_test) == int((data.split == "test").sum())
    assert audit(loaded.subset(np.isin(loaded.ids, [*splits.train.ids, *kept]))).cross_split == (
        {"val": 0, "test": 0}
    )
    assert (
        "drop_leaked: dropped 1 val images (1 with a copy in train, 0 in test) and 3 test "
        "images (a copy in train)"
    ) in splits.notes


def test_every_load_carries_its_audit():
    data = load_dataset("synthetic", num_subjects=3, images_per_class=1)
    assert data.audit is not None and data.audit.images == 21 and data.audit.blank == 0


def test_the_audit_counts_val_test_cross_duplicates_with_examples(tmp_path):
    data = make_synthetic(num_subjects=10, images_per_class=2, seed=3)
    val = np.flatnonzero(data.split == "val")
    test = np.flatnonzero(data.split == "test")
    images = data.images.clone()
    # PublicTest images identical to PrivateTest ones: val[0] once, val[1] twice
    for src, dst in [(val[0], test[0]), (val[1], test[4]), (val[1], test[7])]:
        images[dst] = images[src]
    data.images = images
    write_fer2013_csv(data, tmp_path / "fer2013.csv")
    loaded = load_dataset("fer2013", tmp_path, drop_leaked=True)
    report = loaded.audit
    assert report.val_test == {"val": 2, "test": 3}
    assert report.cross_split == {"val": 0, "test": 0}  # not leakage into train
    assert report.within_split["test"] == 2 and report.within_split["val"] == 0  # test[4], [7]
    assert report.duplicate_groups == 2 and report.duplicate_images == 3
    line = lambda row: f"fer2013.csv:line {row + 2}"  # noqa: E731
    assert report.examples["val/test duplicate"] == [
        f"{line(val[0])} = {line(test[0])}",
        f"{line(val[1])} = {line(test[4])}",
    ]
    summary = report.summary()
    assert "2 val images have an identical copy in test (val/test cross-duplicates)" in summary
    assert "3 test images have an identical copy in val (val/test cross-duplicates)" in summary
    # with drop_leaked the validation images identical to a test image leave validation (model
    # selection must not see test images); test keeps them, as it has no copy in train
    splits = make_splits(loaded, "official")
    assert len(splits.val) == len(val) - 2 and len(splits.test) == len(test)
    assert not {line(val[0]), line(val[1])} & set(splits.val.ids)
    assert splits.full_test is None  # nothing left the test split
    assert (
        "drop_leaked: dropped 2 val images (0 with a copy in train, 2 in test) and 0 test "
        "images (a copy in train)"
    ) in splits.notes
    kept = make_splits(load_dataset("fer2013", tmp_path), "official")
    assert len(kept.val) == len(val)
    assert (
        "2 val images (0 with a copy in train, 2 in test) and 0 test images (a copy in "
        "train) have an identical copy elsewhere (drop_leaked would drop them)"
    ) in kept.notes


def test_no_val_test_count_without_both_splits():
    data = make_synthetic(num_subjects=6, images_per_class=1, seed=0)
    assert audit(data).val_test == {"val": 0, "test": 0}
    assert audit(data.subset(data.split != "val")).val_test == {}


def test_content_groups_are_exact_pixel_equality():
    images = torch.zeros(5, 1, 48, 48, dtype=torch.uint8)
    images[1, 0, 47, 47] = 1  # one pixel differs
    images[3] = images[1]
    images[4, 0, 0, 0] = 255
    group = content_groups(images)
    assert group[0] == group[2] and group[1] == group[3]
    assert len({group[0], group[1], group[4]}) == 3
