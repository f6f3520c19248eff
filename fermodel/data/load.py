"""``load_dataset``: one entry point for every source, with the audit run on every load."""

from __future__ import annotations

import logging

from fermodel.config import DATASETS
from fermodel.data.audit import audit
from fermodel.data.dataset import FERDataset

log = logging.getLogger(__name__)


def load_dataset(name: str, path=None, drop_leaked: bool = False, **options) -> FERDataset:
    """Load ``name`` (``fer2013``, ``ckplus`` or ``synthetic``) from ``path``, the format
    detected from what the path holds; ``options`` go to the reader
    (``read_fer2013``, ``read_ckplus``, ``make_synthetic``).

    The audit (``dataset.audit``) is computed and logged on every load, on the source's own
    splits. ``drop_leaked`` marks the dataset (``dataset.drop_leaked``) so that ``make_splits``
    drops leaked images from the final splits, whatever their origin: the source's, those carved
    from train (Kaggle's train.csv, folders without Usage prefixes), CK+ folds, balanced
    training sets (see ``fermodel.data.protocols``). Nothing is removed here: the test split's
    whole is still reported beside its deduplicated part.
    """
    if name == "synthetic":
        from fermodel.data.synthetic import make_synthetic

        if path is not None:
            raise ValueError("the synthetic dataset is generated, it takes no path")
        dataset = make_synthetic(**options)
    elif name == "fer2013":
        from fermodel.data.fer2013 import read_fer2013

        dataset = read_fer2013(_required(name, path), **options)
    elif name == "ckplus":
        from fermodel.data.ckplus import read_ckplus

        dataset = read_ckplus(_required(name, path), **options)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    report = audit(dataset)
    log.info(report.summary())
    dataset.drop_leaked = drop_leaked
    dataset.audit = report
    return dataset


def _required(name: str, path):
    if path is None:
        raise ValueError(f"dataset {name!r} needs a path to your copy of it")
    return path
