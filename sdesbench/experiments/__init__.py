"""Experiments: table specs (`spec`), their expansion into runs (`plan`, `sweeps`) and the launchers
that train them (`launch`)."""
