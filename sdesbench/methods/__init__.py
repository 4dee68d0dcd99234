"""Distillation methods: one file each, registered with `@METHODS.register(name)`; importing this
package imports them all, so `from sdesbench.methods import METHODS` sees every method."""
from sdesbench.methods.base import METHODS
from sdesbench.registry import import_submodules

__all__ = ["METHODS"]

import_submodules(__name__, __path__)
