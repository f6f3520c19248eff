"""Datasets: FER2013 / FER+ / CK+ readers, the synthetic set, protocols and the audit.

``load_dataset(name, path, **options)`` reads any source into one ``FERDataset``;
``make_splits(dataset, protocol, ...)`` turns it into train / val / test.
"""

from fermodel.data.audit import DataAudit, audit
from fermodel.data.dataset import (
    CKPLUS_CLASSES,
    FER2013_CLASSES,
    DatasetError,
    FERDataset,
)
from fermodel.data.load import DATASETS, load_dataset
from fermodel.data.protocols import PROTOCOLS, Splits, make_splits
from fermodel.data.synthetic import make_synthetic

__all__ = [
    "CKPLUS_CLASSES",
    "DATASETS",
    "FER2013_CLASSES",
    "PROTOCOLS",
    "DataAudit",
    "DatasetError",
    "FERDataset",
    "Splits",
    "audit",
    "load_dataset",
    "make_splits",
    "make_synthetic",
]
