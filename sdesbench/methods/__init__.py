"""Distillation methods: one file each, registered with `@METHODS.register(name)`."""
