"""A data audit run on every load: exact duplicates, cross-split copies, label conflicts, blanks.

FER2013 holds hundreds of PrivateTest images with a byte-identical copy in Training (some under
another label) and a few blank frames; a model can score such test images by memory. The audit
counts them and gives examples, and ``drop_leaked`` removes every val/test image that has an
identical copy in the training split, so accuracy can be measured without that leakage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
        for kind, ids in self.examples.items():
            if ids:
                lines.append(f"  e.g. {kind}: {', '.join(ids)}")
        return "\n".join(lines)


def _groups(dataset: FERDataset) -> tuple[np.ndarray, np.ndarray]:
    """For every image the id of its identical-bytes group, and each group's size."""
    flat = np.ascontiguousarray(dataset.images.reshape(len(dataset), -1).numpy())
    rows = flat.view(np.dtype((np.void, flat.shape[1]))).ravel()
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    return inverse.ravel(), counts


def leaked(dataset: FERDataset) -> np.ndarray:
    """Mask of val/test images that have an identical copy in the train split."""
    group, _ = _groups(dataset)
    in_train = np.zeros(group.max() + 1 if len(group) else 0, dtype=bool)
    in_train[group[dataset.split == "train"]] = True
    return (dataset.split != "train") & (dataset.split != "") & in_train[group]


def audit(dataset: FERDataset) -> DataAudit:
    n = len(dataset)
    if n == 0:
        return DataAudit(0, 0, 0, {}, {}, 0, 0)
    group, counts = _groups(dataset)
    labels = dataset.labels.numpy()
    duplicated = counts[group] > 1

    # a group conflicts when its smallest and largest label differ
    lo = np.full(len(counts), np.iinfo(np.int64).max)
    hi = np.full(len(counts), np.iinfo(np.int64).min)
    np.minimum.at(lo, group, labels)
    np.maximum.at(hi, group, labels)
    conflicting = (counts > 1) & (lo != hi)

    within, cross = {}, {}
    for split in [str(s) for s in np.unique(dataset.split) if s]:
        in_split = dataset.split == split
        per_group = np.bincount(group[in_split], minlength=len(counts))
        within[split] = int((in_split & (per_group[group] > 1)).sum())
    leak = leaked(dataset)
    for split in ("val", "test"):
        if (dataset.split == split).any():
            cross[split] = int((leak & (dataset.split == split)).sum())

    flat = dataset.images.reshape(n, -1)
    blank = (flat.amax(dim=1).int() - flat.amin(dim=1).int() <= BLANK_RANGE).numpy()
    ids = dataset.ids
    return DataAudit(
        images=n,
        duplicate_groups=int((counts > 1).sum()),
        duplicate_images=int((counts[counts > 1] - 1).sum()),
        within_split=within,
        cross_split=cross,
        conflicting_groups=int(conflicting.sum()),
        blank=int(blank.sum()),
        examples={
            "duplicate": ids[duplicated][:EXAMPLES].tolist(),
            "leaked": ids[leak][:EXAMPLES].tolist(),
            "conflicting labels": ids[conflicting[group]][:EXAMPLES].tolist(),
            "blank": ids[blank][:EXAMPLES].tolist(),
        },
    )
