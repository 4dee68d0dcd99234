"""Datasets. Each module registers its dataset class with `@DATASETS.register(name)`."""
