"""Protocols: official splits, subject-independent folds, the paper's split, balancing."""

import numpy as np
import pytest
import torch

from fermodel.data import DatasetError, make_splits, make_synthetic
from fermodel.data.protocols import subject_folds
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
    assert (
        len(s.val) == (skewed.split == "val").sum()
        and len(s.test) == (skewed.split == "test").sum()
    )
    copies = s.train.images[len(skewed.subset(skewed.split == "train")) :]
    originals = s.train.images[s.train.labels == 1][:10]
    assert not any(torch.equal(c, o) for c in copies for o in originals)
    png = plot_class_distribution(before, tmp_path / "dist.png", after=after, title="FER2013")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="cannot balance unknown class 'contempt'"):
        make_splits(skewed, "official", balance="contempt")
