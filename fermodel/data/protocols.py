"""Evaluation protocols: which images a trial trains on, selects on, and reports.

- ``official`` (FER2013, synthetic): the dataset's own splits. FER2013 trains on Training,
  selects on PublicTest, and reports PrivateTest once; nothing is ever selected on test. A
  source without a val (or test) split, such as Kaggle's train.csv, gets one carved from train:
  10% of each class, stratified, and grouped by content, so that every copy of an image (FER2013's
  Training holds thousands of exact duplicates) falls on one side; a note says so.
- ``kfold`` (CK+, synthetic): subject-independent k-fold cross-validation, stratified by class as
  far as the subjects allow (scikit-learn's StratifiedGroupKFold); no subject is in two folds.
  Fold f is the test set, fold f+1 (mod k) the validation set, the rest is trained on.
  ``repetition`` r > 0 draws the folds anew (repeated k-fold) from the seed pair
  (``seed``, r); repetition 0 is the split ``seed`` alone draws.
- ``paper``: Gu & Jin's CK+ protocol: augmented copies are made first, then every class is split
  2:1 at random into train and validation, and the validation set is also the reported set. It
  puts frames of one subject and copies of one image on both sides, so it warns.

``balance`` adds augmented copies of under-represented classes to the training split only
(the paper balances FER2013's disgust class): each named class, or with ``"minority"`` every
class, below the median training class count is topped up to it. Validation and test images
are never added or removed by it.

``drop_leaked`` (or a dataset loaded with ``drop_leaked=True``) works on the final splits, whatever
their origin (the source's, carved, folds, balanced): it removes from validation every image with
an identical copy in train or in test (selection must not see test images: FER2013's PublicTest
and PrivateTest share 43 groups of identical images), and from test every image with an identical
copy in train. The test split before that removal stays in ``Splits.full_test``, so that a trial
reports its accuracy on the whole test set (FER2013's full PrivateTest, what the paper and the
field report) beside the deduplicated one. Without ``drop_leaked`` a note counts such images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fermodel.augment import AugmentConfig, augment_copies
from fermodel.config import PROTOCOLS
from fermodel.data.audit import content_groups
from fermodel.data.dataset import DatasetError, FERDataset


@dataclass
class Splits:
    train: FERDataset
    val: FERDataset
    test: FERDataset
    notes: list[str] = field(default_factory=list)
    # the test split before drop_leaked removed images from it (None when it removed none)
    full_test: FERDataset | None = None


def make_splits(
    dataset: FERDataset,
    protocol: str = "official",
    fold: int = 0,
    folds: int = 10,
    seed: int = 0,
    balance: str | tuple[str, ...] | None = None,
    paper_copies: int = 3,
    drop_leaked: bool | None = None,
    repetition: int = 0,
) -> Splits:
    """Split ``dataset`` by ``protocol`` (see the module docstring); deterministic per seed.

    ``balance`` tops up the training split only. ``drop_leaked`` drops val/test images with an
    identical copy in the final train split; ``None`` follows ``dataset.drop_leaked`` (set by
    ``load_dataset(..., drop_leaked=True)``).
    """
    if (
        isinstance(paper_copies, bool)
        or not isinstance(paper_copies, (int, np.integer))
        or (paper_copies < 0)
    ):
        raise ValueError(f"paper_copies must be a non-negative integer, got {paper_copies!r}")
    if drop_leaked is None:
        drop_leaked = dataset.drop_leaked
    if protocol == "official":
        splits = _official(dataset, seed)
    elif protocol == "kfold":
        splits = _kfold(dataset, fold, folds, fold_seed(seed, repetition))
        if repetition:
            splits.notes[0] += f" of repetition {repetition}"
    elif protocol == "paper":
        splits = _paper(dataset, seed, paper_copies)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if balance is not None:
        splits.train = _balance(splits.train, balance, seed, splits.notes)
    _leaks(splits, drop_leaked)
    for part in ("train", "val", "test"):
        if len(getattr(splits, part)) == 0:
            raise DatasetError(f"{dataset.name}: the {part} split of protocol {protocol} is empty")
    return splits


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator):
    """Indices (into ``labels``) of a class-stratified random ``fraction``."""
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=int)


def _grouped_holdout(
    labels: np.ndarray, groups: np.ndarray, fraction: float, rng: np.random.Generator
):
    """Indices (into ``labels``) of a class-stratified random ``fraction`` made of whole
    groups: every image of a group (the copies of one image) is held out or none is.

    A group counts for the class of its first image. Per class, the groups are shuffled and
    taken while they fit within ``fraction`` of the class's images (at least one group, none
    when the class has a single group). Without duplicates this is ``_stratified_holdout``,
    draw for draw.
    """
    _, first, inverse, sizes = np.unique(
        groups, return_index=True, return_inverse=True, return_counts=True
    )
    inverse = inverse.ravel()
    order = np.argsort(first, kind="stable")  # groups in the order of their first image
    group_label = labels[first]
    chosen = []
    for c in np.unique(labels):
        members = order[group_label[order] == c]
        shuffled = rng.permutation(members)
        if len(members) <= 1:
            continue
        target = max(1, round(fraction * int(sizes[members].sum())))
        take = max(1, int(np.searchsorted(np.cumsum(sizes[shuffled]), target, side="right")))
        chosen.append(shuffled[:take])
    if not chosen:
        return np.array([], dtype=int)
    return np.flatnonzero(np.isin(inverse, np.concatenate(chosen)))


def _official(dataset: FERDataset, seed: int) -> Splits:
    split = dataset.split.copy()
    notes = []
    if not (split == "train").any():
        raise DatasetError(f"{dataset.name}: no train split; use protocol 'kfold' or 'paper'")
    rng = np.random.default_rng(seed)
    groups = None
    for part in ("test", "val"):
        if not (split == part).any():
            if groups is None:
                groups = content_groups(dataset.images)
            train = np.flatnonzero(split == "train")
            held = _grouped_holdout(dataset.labels.numpy()[train], groups[train], 0.1, rng)
            carved = train[held]
            split[carved] = part
            notes.append(
                f"{dataset.name} has no {part} split: {len(carved)} train images "
                f"(10%, stratified, every copy of an image on one side, seed {seed}) "
                f"held out as {part}"
            )
    return Splits(
        dataset.subset(split == "train"),
        dataset.subset(split == "val"),
        dataset.subset(split == "test"),
        notes,
    )


def fold_seed(seed: int, repetition: int) -> int:
    """The seed of repetition ``repetition``'s folds: ``seed`` itself for repetition 0, so that a
    single k-fold split is what it always was, else one drawn from the pair."""
    if repetition == 0:
        return seed
    return int(np.random.SeedSequence([seed, repetition]).generate_state(1)[0])


def subject_folds(dataset: FERDataset, folds: int = 10, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of every image; all images of a subject share one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    if dataset.subjects is None:
        raise DatasetError(f"{dataset.name}: subject-independent folds need subjects")
    n_subjects = len(np.unique(dataset.subjects))
    if folds < 3 or folds > n_subjects:
        raise ValueError(f"folds must be between 3 and the {n_subjects} subjects, got {folds}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = np.full(len(dataset), -1)
    for f, (_, test) in enumerate(
        splitter.split(np.zeros(len(dataset)), dataset.labels.numpy(), dataset.subjects)
    ):
        assignment[test] = f
    return assignment


def _kfold(dataset: FERDataset, fold: int, folds: int, seed: int) -> Splits:
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    assignment = subject_folds(dataset, folds, seed)
    val_fold = (fold + 1) % folds
    train = (assignment != fold) & (assignment != val_fold)
    return Splits(
        dataset.subset(train),
        dataset.subset(assignment == val_fold),
        dataset.subset(assignment == fold),
        [f"subject-independent {folds}-fold: test fold {fold}, validation fold {val_fold}"],
    )


def _paper(dataset: FERDataset, seed: int, copies: int) -> Splits:
    warnings.warn(
        "protocol 'paper' splits after augmentation and per class at random: frames of one "
        "subject and copies of one image fall on both sides, and the reported set is the "
        "validation set, so its accuracy is optimistic; use 'kfold' for honest CK+ numbers",
        UserWarning,
        stacklevel=3,
    )
    g = torch.Generator().manual_seed(seed)
    parts = [dataset]
    config = AugmentConfig()
    for _ in range(copies):
        parts.append(
            replace(dataset, images=augment_copies(dataset.images, len(dataset), config, g))
        )
    pooled = _concat(parts, "augmented")
    rng = np.random.default_rng(seed)
    val = np.zeros(len(pooled), dtype=bool)
    val[_stratified_holdout(pooled.labels.numpy(), 1 / 3, rng)] = True
    notes = [f"paper protocol: {copies} augmented copies per image, then a per-class 2:1 split"]
    return Splits(pooled.subset(~val), pooled.subset(val), pooled.subset(val), notes)


def _concat(parts: list[FERDataset], tag: str) -> FERDataset:
    first = parts[0]
    ids = [first.ids] + [np.char.add(p.ids, f"#{tag}{i}") for i, p in enumerate(parts[1:], 1)]
    return replace(
        first,
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        split=np.concatenate([p.split for p in parts]),
        ids=np.concatenate(ids),
        subjects=None if first.subjects is None else np.concatenate([p.subjects for p in parts]),
        notes=list(first.notes),
        audit=None,
    )


def _balance(train: FERDataset, balance, seed: int, notes: list[str]) -> FERDataset:
    counts = train.class_counts()
    names = (
        list(counts)
        if balance == "minority"
        else [balance]
        if isinstance(balance, str)
        else list(balance)
    )
    unknown = [c for c in names if c not in counts]
    if unknown:
        raise ValueError(f"cannot balance unknown class {unknown[0]!r}; classes: {list(counts)}")
    target = int(np.median(list(counts.values())))
    empty = [c for c in names if counts[c] == 0 and target > 0]
    if empty and balance != "minority":
        raise DatasetError(
            f"{train.name}: cannot balance {empty[0]!r}: the train split has no image of it to copy"
        )
    g = torch.Generator().manual_seed(seed + 1)
    parts = [train]
    labels = train.labels
    for c in names:
        missing = target - counts[c]
        if counts[c] == 0 and missing > 0:
            notes.append(f"balance: the train split has no {c} image to copy; {c} stays at 0")
            continue
        if missing <= 0:
            if balance != "minority":
                notes.append(
                    f"balance {c}: {counts[c]} training images, at or above the median "
                    f"{target}; unchanged"
                )
            continue
        members = torch.nonzero(labels == train.classes.index(c)).flatten().numpy()
        source = train.subset(members)
        copies = augment_copies(source.images, missing, AugmentConfig(), g)
        pick = np.arange(missing) % len(members)
        parts.append(replace(source.subset(pick), images=copies))
        notes.append(f"balanced {c}: {counts[c]} -> {target} training images (augmented copies)")
    return _concat(parts, "balanced") if len(parts) > 1 else train


def _leaks(splits: Splits, drop: bool) -> None:
    """Drop (or, without ``drop``, count) val images with a copy in train or test, and test
    images with a copy in train, of the final splits."""
    parts = (splits.train, splits.val, splits.test)
    group = content_groups(torch.cat([p.images for p in parts]))
    n_train, n_val = len(splits.train), len(splits.val)
    seen = np.zeros((3, group.max() + 1 if len(group) else 0), dtype=bool)
    bounds = (0, n_train, n_train + n_val, len(group))
    for k in range(3):
        seen[k, group[bounds[k] : bounds[k + 1]]] = True
    val_group, test_group = group[n_train : n_train + n_val], group[n_train + n_val :]
    val_in_train, val_in_test = seen[0, val_group], seen[2, val_group]
    test_in_train = seen[0, test_group]
    val_drop = val_in_train | val_in_test
    counts = (
        f"{int(val_drop.sum())} val images ({int(val_in_train.sum())} with a copy in "
        f"train, {int(val_in_test.sum())} in test) and {int(test_in_train.sum())} test "
        f"images (a copy in train)"
    )
    if drop:
        if val_drop.any():
            splits.val = splits.val.subset(~val_drop)
        if test_in_train.any():
            splits.full_test = splits.test
            splits.test = splits.test.subset(~test_in_train)
        splits.notes.append(f"drop_leaked: dropped {counts}")
    elif val_drop.any() or test_in_train.any():
        splits.notes.append(
            f"{counts} have an identical copy elsewhere (drop_leaked would drop them)"
        )
