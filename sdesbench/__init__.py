"""sdesbench: reproduce the tables of SDES (AAAI 2023) and the distillation methods it compares."""

__version__ = "0.1.0"
IGNORE_INDEX = 255
