"""The one in-memory dataset type every reader returns, and the error every reader raises."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

IMAGE_SIZE = 48
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# CK+ emotion codes 1..7 in order; code 0 (neutral) only when asked for
CKPLUS_CLASSES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")


class DatasetError(ValueError):
    """Bad input data: the message names the file, the row or line, and what is wrong."""


@dataclass
class FERDataset:
    """Images as compact uint8 tensors, small enough to live in memory (and on a GPU).

    images    uint8 [N, 1, 48, 48]
    labels    int64 [N], indices into ``classes``
    classes   class names in label order
    split     str [N], "train" / "val" / "test" where the source defines it, "" where it does not
              (CK+: the protocol assigns folds)
    subjects  str [N] or None: who is in the image (CK+, synthetic), for subject-independent folds
    ids       str [N]: where each image came from ("fer2013.csv:line 9", a file path), for reports
    drop_leaked  set by ``load_dataset(..., drop_leaked=True)``: ``make_splits`` then drops the
              final splits' leaked images (val: a copy in train or test; test: a copy in train)
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    split: np.ndarray
    ids: np.ndarray
    subjects: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)  # what loading did (cleaning, relabelling)
    audit: object | None = None  # a fermodel.data.audit.DataAudit, filled in by load_dataset
    drop_leaked: bool = False

    def __post_init__(self):
        n = len(self.labels)
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"images must be uint8 [N, 1, 48, 48], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        for name in ("images", "split", "ids", "subjects"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> FERDataset:
        """The images at ``index`` (a boolean mask or integer indices), same classes."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        t = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            images=self.images[t],
            labels=self.labels[t],
            split=self.split[index],
            ids=self.ids[index],
            subjects=None if self.subjects is None else self.subjects[index],
            notes=list(self.notes),
            audit=None,
        )

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        labels = (
            self.labels if split is None else self.labels[torch.from_numpy(self.split == split)]
        )
        counts = torch.bincount(labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts, strict=True))
