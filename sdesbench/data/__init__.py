"""Datasets. Each module registers its dataset class with `@DATASETS.register(name)`; importing
this package imports them all, so `from sdesbench.data import DATASETS` sees every dataset."""
from sdesbench.data.base import DATASETS
from sdesbench.registry import import_submodules

__all__ = ["DATASETS"]

import_submodules(__name__, __path__)
