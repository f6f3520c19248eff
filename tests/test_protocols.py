"""Protocols: official splits, subject-independent folds, the paper's split, balancing."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fermodel.data import DatasetError, load_dataset, make_splits, make_synthetic
from fermodel.data.fakes import write_fer2013_csv
from fermodel.data.protocols import _grouped_holdout, _stratified_holdout, subject_folds
from fermodel.plots import plot_class_distribution


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_subjects=20, images_per_class=2, seed=4)


def test_official_uses_the_sources_splits_and_never_tests_on_selection_data(data):
    s = make_splits(data, "official")
    assert (s.train.split == "train").all() and (s.val.split == "val").all()
    assert (s.test.split == "test").all()
    assert len(s.train) + len(s.val) + len(s.test) == len(data)


def test_official_carves_missing_val_and_test_from_train(data):
    only_train = data.subset(data.split == "train")
    s = make_splits(only_train, "official", seed=1)
    assert len(s.val) > 0 and len(s.test) > 0
    assert len(s.train) + len(s.val) + len(s.test) == len(only_train)
    assert not set(s.val.ids) & set(s.train.ids) and not set(s.test.ids) & set(s.val.ids)
    assert any("no val split" in n for n in s.notes) and any("no test split" in n for n in s.notes)
    # stratified: every class keeps about 10% for test
    assert set(s.test.class_counts().values()) == {round(0.1 * len(only_train) / 7)}


@pytest.mark.parametrize("folds", [5, 10])
def test_kfold_is_subject_independent_and_covers_every_image_once(data, folds):
    assignment = subject_folds(data, folds=folds, seed=0)
    assert set(assignment) == set(range(folds))
    for subject in np.unique(data.subjects):
        assert len(set(assignment[data.subjects == subject])) == 1
    tests = [make_splits(data, "kfold", fold=f, folds=folds).test for f in range(folds)]
    all_ids = np.concatenate([t.ids for t in tests])
    assert sorted(all_ids) == sorted(data.ids)  # every image is tested exactly once
    s = make_splits(data, "kfold", fold=2, folds=folds)
    subjects = [set(part.subjects) for part in (s.train, s.val, s.test)]
    assert not subjects[0] & subjects[1] and not subjects[0] & subjects[2]
    assert not subjects[1] & subjects[2]


def test_kfold_is_stratified_as_far_as_subjects_allow(data):
    # every subject shows every class equally, so each fold's classes are exactly balanced
    for f in range(5):
        counts = make_splits(data, "kfold", fold=f, folds=5).test.class_counts()
        assert len(set(counts.values())) == 1


def test_kfold_errors(data):
    with pytest.raises(ValueError, match="fold must be in 0..9"):
        make_splits(data, "kfold", fold=10)
    with pytest.raises(ValueError, match="folds must be between 3 and the 20 subjects"):
        make_splits(data, "kfold", folds=21)
    no_subjects = data.subset(np.arange(len(data)))
    no_subjects.subjects = None
    with pytest.raises(DatasetError, match="subject-independent folds need subjects"):
        make_splits(no_subjects, "kfold")
    with pytest.raises(ValueError, match="unknown protocol 'loso'; known: official, kfold, paper"):
        make_splits(data, "loso")


def test_paper_protocol_warns_and_splits_each_class_two_to_one(data):
    with pytest.warns(UserWarning, match="frames of one subject and copies of one image"):
        s = make_splits(data, "paper", paper_copies=2, seed=0)
    assert len(s.train) + len(s.val) == 3 * len(data)
    for c in range(7):
        n_val, n_train = int((s.val.labels == c).sum()), int((s.train.labels == c).sum())
        assert n_val == round((n_val + n_train) / 3)
    assert torch.equal(s.test.images, s.val.images)  # the paper reports its validation set
    assert set(s.train.subjects) & set(s.val.subjects)  # what the warning is about


def test_balancing_tops_up_the_training_split_only(data, tmp_path):
    drop = np.flatnonzero((data.labels == 1).numpy() & (data.split == "train"))[10:]
    skewed = data.subset(np.setdiff1d(np.arange(len(data)), drop))
    before = skewed.class_counts("train")
    s = make_splits(skewed, "official", balance="disgust", seed=0)
    after = s.train.class_counts()
    assert before["disgust"] == 10 and after["disgust"] == before["angry"]
    assert {c: n for c, n in after.items() if c != "disgust"} == {
        c: n for c, n in before.items() if c != "disgust"
    }
    # val and test are exactly the source's, image for image
    assert (s.val.ids == skewed.ids[skewed.split == "val"]).all()
    assert (s.test.ids == skewed.ids[skewed.split == "test"]).all()
    assert torch.equal(s.test.images, skewed.images[torch.from_numpy(skewed.split == "test")])
    copies = s.train.images[len(skewed.subset(skewed.split == "train")) :]
    originals = s.train.images[s.train.labels == 1][:10]
    assert not any(torch.equal(c, o) for c in copies for o in originals)
    png = plot_class_distribution(before, tmp_path / "dist.png", after=after, title="FER2013")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="cannot balance unknown class 'contempt'"):
        make_splits(skewed, "official", balance="contempt")


# --------------------------------------------------------------------------- duplicates, leaks


def contents(d) -> list[bytes]:
    return [bytes(row) for row in d.images.reshape(len(d), -1).numpy()]


@pytest.fixture(scope="module")
def doubled_train_csv(tmp_path_factory):
    """Kaggle's train.csv (Training rows only, no Usage) in which every image occurs twice,
    the second copies in shuffled order, as FER2013's duplicates lie scattered."""
    base = make_synthetic(num_subjects=30, images_per_class=1, seed=7)
    n = len(base)
    rows = np.concatenate([np.arange(n), np.random.default_rng(0).permutation(n)])
    doubled = base.subset(rows)
    doubled.split = np.full(len(doubled), "train")
    path = tmp_path_factory.mktemp("kaggle") / "train.csv"
    write_fer2013_csv(doubled, path, "kaggle")
    return path.parent, n


@pytest.mark.parametrize("drop_leaked", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_carved_splits_keep_every_copy_of_an_image_on_one_side(
    doubled_train_csv, drop_leaked, seed
):
    path, n = doubled_train_csv
    data = load_dataset("fer2013", path, drop_leaked=drop_leaked)
    assert data.audit.duplicate_groups == n and data.audit.within_split == {"train": 2 * n}
    s = make_splits(data, "official", seed=seed)
    assert any("no val split" in note for note in s.notes)
    assert any("no test split" in note for note in s.notes)
    sides = {}
    for part in ("train", "val", "test"):
        for image in contents(getattr(s, part)):
            sides.setdefault(image, []).append(part)
    # nothing was dropped, and both copies of every image went to one side
    assert sorted(len(v) for v in sides.values()) == [2] * n
    assert all(len(set(v)) == 1 for v in sides.values())
    in_train = set(contents(s.train))
    assert not in_train & set(contents(s.val)) and not in_train & set(contents(s.test))
    # still stratified, about 10% of each class (whole pairs), for val and for test
    for part in (s.val, s.test):
        counts = part.class_counts()
        assert all(n_c in (4, 6) for n_c in counts.values()), counts  # 10% of 2 x 30 = 6
    if drop_leaked:
        assert (
            "drop_leaked: dropped 0 val images (0 with a copy in train, 0 in test) and 0 "
            "test images (a copy in train)"
        ) in s.notes


def test_without_duplicates_grouped_carving_draws_what_the_stratified_draw_did():
    labels = np.random.default_rng(3).integers(0, 7, size=500)
    for seed in range(3):
        grouped = _grouped_holdout(labels, np.arange(500), 0.1, np.random.default_rng(seed))
        plain = _stratified_holdout(labels, 0.1, np.random.default_rng(seed))
        assert grouped.tolist() == plain.tolist()


def test_drop_leaked_works_on_the_final_splits_of_any_protocol(data):
    """A kfold test image identical to another subject's training image: invisible to the
    load-time audit (CK+-like data has no split), dropped from the final test split."""
    folds = 5
    assignment = subject_folds(data, folds=folds, seed=0)
    fold = 1
    copy = np.flatnonzero(assignment == fold)[0]
    source = np.flatnonzero((assignment != fold) & (assignment != (fold + 1) % folds))[0]
    images = data.images.clone()
    images[copy] = images[source]
    planted = replace(data, images=images)
    kept = make_splits(planted, "kfold", fold=fold, folds=folds)
    assert data.ids[copy] in kept.test.ids
    assert (
        "0 val images (0 with a copy in train, 0 in test) and 1 test images (a copy in "
        "train) have an identical copy elsewhere (drop_leaked would drop them)"
    ) in kept.notes
    dropped = make_splits(planted, "kfold", fold=fold, folds=folds, drop_leaked=True)
    assert sorted(dropped.test.ids) == sorted(set(kept.test.ids) - {data.ids[copy]})
    assert (
        "drop_leaked: dropped 0 val images (0 with a copy in train, 0 in test) and 1 test "
        "images (a copy in train)"
    ) in dropped.notes
    # the whole test fold stays beside, for the accuracy on the full test split
    assert sorted(dropped.full_test.ids) == sorted(kept.test.ids)
    # a dataset loaded with drop_leaked=True carries the choice to make_splits
    marked = replace(planted, drop_leaked=True)
    assert sorted(make_splits(marked, "kfold", fold=fold, folds=folds).test.ids) == sorted(
        dropped.test.ids
    )
    assert len(make_splits(marked, "kfold", fold=fold, folds=folds, drop_leaked=False).test) == (
        len(kept.test)
    )


def test_balancing_errors(data):
    train = data.split == "train"
    no_disgust = data.subset(~(train & (data.labels == 1).numpy()))
    with pytest.raises(DatasetError, match="cannot balance 'disgust': the train split has no"):
        make_splits(no_disgust, "official", balance="disgust")
    s = make_splits(no_disgust, "official", balance="minority")
    assert any("no disgust image to copy" in note for note in s.notes)
    s = make_splits(data, "official", balance="happy")
    assert any("balance happy:" in note and "unchanged" in note for note in s.notes)
    with pytest.raises(ValueError, match="paper_copies must be a non-negative integer"):
        make_splits(data, "paper", paper_copies=-1)
