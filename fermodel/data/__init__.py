"""Datasets: readers for FER2013 / FER+ / CK+, protocols, audit, and the synthetic set."""

from fermodel.data.dataset import FER2013_CLASSES, DatasetError, FERDataset
from fermodel.data.synthetic import make_synthetic

__all__ = ["FER2013_CLASSES", "DatasetError", "FERDataset", "make_synthetic"]
