"""A data audit run on every load: exact duplicates, cross-split copies, label conflicts, blanks.

FER2013 holds hundreds of PrivateTest images with a byte-identical copy in Training (some under
another label), PublicTest images identical to PrivateTest ones, thousands of duplicates within
Training, and a few blank frames; a model can score such test images by memory. The audit
counts them and gives examples. ``leaked`` marks the val/test images that have an identical
copy in the train split; with ``drop_leaked`` ``make_splits`` removes such images from the final
splits (carved ones and folds included), and validation images identical to a test image too,
so accuracy can be measured without that leakage.

Images are grouped by content: a 64-bit BLAKE2 digest of the pixels, with the copies of every
digest compared byte for byte, so two images share a group exactly when their pixels are equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from fermodel.data.dataset import FERDataset

BLANK_RANGE = 4  # an image whose pixels all lie within this many gray levels is blank
EXAMPLES = 5


@dataclass
class DataAudit:
    images: int
    duplicate_groups: int  # distinct images that occur more than once
    duplicate_images: int  # images in those groups beyond the first of each
    within_split: dict[str, int]  # per split: images with an identical copy in the same split
    cross_split: dict[str, int]  # per val/test split: images with an identical copy in train
    conflicting_groups: int  # duplicate groups whose copies carry different labels
    blank: int
    # "val": val images with an identical copy in test; "test": test images with one in val
    # (FER2013: PublicTest images identical to PrivateTest ones); only where both splits exist
    val_test: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"audit of {self.images} images: {self.duplicate_groups} images occur more than "
            f"once ({self.duplicate_images} extra copies), {self.conflicting_groups} of them "
            f"with conflicting labels; {self.blank} blank images",
        ]
        for split, n in self.within_split.items():
            if n:
                lines.append(f"  {n} {split} images have an identical copy in {split}")
        for split, n in self.cross_split.items():
            if n:
                lines.append(f"  {n} {split} images have an identical copy in train (leakage)")
        for split, n in self.val_test.items():
            other = "test" if split == "val" else "val"
            if n:
                lines.append(
                    f"  {n} {split} images have an identical copy in {other} "
                    f"(val/test cross-duplicates)"
                )
        for kind, ids in self.examples.items():
            if ids:
                lines.append(f"  e.g. {kind}: {', '.join(ids)}")
        return "\n".join(lines)


def content_groups(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """For every image the id (0..groups-1) of its group of identical images: two images share
    an id exactly when all of their pixels are equal."""
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    if len(flat) == 0:
        return np.zeros(0, dtype=np.int64)
    digests = b"".join(hashlib.blake2b(row, digest_size=8).digest() for row in flat)
    _, first, inverse, counts = np.unique(
        np.frombuffer(digests, dtype=np.uint64),
        return_index=True,
        return_inverse=True,
        return_counts=True,
    )
    inverse = inverse.ravel()
    shared = np.flatnonzero(counts[inverse] > 1)
    if not (flat[shared] == flat[first[inverse[shared]]]).all():
        # a digest collision (never seen in practice): group by the bytes themselves
        rows = flat.view(np.dtype((np.void, flat.shape[1]))).ravel()
        _, inverse = np.unique(rows, return_inverse=True)
    return inverse.ravel().astype(np.int64)


def leaked(dataset: FERDataset) -> np.ndarray:
    """Mask of val/test images that have an identical copy in the train split."""
    group = content_groups(dataset.images)
    in_train = np.zeros(group.max() + 1 if len(group) else 0, dtype=bool)
    in_train[group[dataset.split == "train"]] = True
    return (dataset.split != "train") & (dataset.split != "") & in_train[group]


def audit(dataset: FERDataset) -> DataAudit:
    n = len(dataset)
    if n == 0:
        return DataAudit(0, 0, 0, {}, {}, 0, 0)
    group = content_groups(dataset.images)
    counts = np.bincount(group)
    labels = dataset.labels.numpy()
    duplicated = counts[group] > 1

    # a group conflicts when its smallest and largest label differ
    lo = np.full(len(counts), np.iinfo(np.int64).max)
    hi = np.full(len(counts), np.iinfo(np.int64).min)
    np.minimum.at(lo, group, labels)
    np.maximum.at(hi, group, labels)
    conflicting = (counts > 1) & (lo != hi)

    within, cross, val_test = {}, {}, {}
    in_split = {}
    for split in [str(s) for s in np.unique(dataset.split) if s]:
        mask = dataset.split == split
        per_group = np.bincount(group[mask], minlength=len(counts))
        in_split[split] = per_group > 0
        within[split] = int((mask & (per_group[group] > 1)).sum())
    leak = leaked(dataset)
    for split in ("val", "test"):
        if split in in_split:
            cross[split] = int((leak & (dataset.split == split)).sum())
    ids = dataset.ids
    pairs: list[str] = []
    if "val" in in_split and "test" in in_split:
        val, test = dataset.split == "val", dataset.split == "test"
        val_copied = val & in_split["test"][group]
        test_copied = test & in_split["val"][group]
        val_test = {"val": int(val_copied.sum()), "test": int(test_copied.sum())}
        # each example names a val image and a test image identical to it
        for i in np.flatnonzero(val_copied)[:EXAMPLES]:
            j = np.flatnonzero(test_copied & (group == group[i]))[0]
            pairs.append(f"{ids[i]} = {ids[j]}")

    flat = dataset.images.reshape(n, -1)
    blank = (flat.amax(dim=1).int() - flat.amin(dim=1).int() <= BLANK_RANGE).numpy()
    return DataAudit(
        images=n,
        duplicate_groups=int((counts > 1).sum()),
        duplicate_images=int((counts[counts > 1] - 1).sum()),
        within_split=within,
        cross_split=cross,
        conflicting_groups=int(conflicting.sum()),
        blank=int(blank.sum()),
        val_test=val_test,
        examples={
            "duplicate": ids[duplicated][:EXAMPLES].tolist(),
            "leaked": ids[leak][:EXAMPLES].tolist(),
            "val/test duplicate": pairs,
            "conflicting labels": ids[conflicting[group]][:EXAMPLES].tolist(),
            "blank": ids[blank][:EXAMPLES].tolist(),
        },
    )
