"""Hyper-parameter sweeps (Figure 3): a sweep spec turned into one group per parameter.

The sweep spec (`experiments/fig3.yaml`) names `method`, `model`, shared `options`, and per
parameter the method `option` it sets, default `values`, `domain` [lo, hi] and `integer`. Each
value is one row of the swept method with that option overridden; the rows expand like any
table's. Values that `sdesbench ablate` ran beyond the spec's are remembered in
`results/<table>-<preset>.sweeps.json`, so `sdesbench report fig3` plots them too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sdesbench.errors import ConfigError, StorageError
from sdesbench.experiments.spec import Group, Row, Spec
from sdesbench.io import read_json, write_json
from sdesbench.methods import METHODS


def sweep_group(spec: Spec, param: str, values: list[Any] | None = None) -> Group:
    """One row of the swept method per value of `param`."""
    sw = spec.sweep(param)
    values = list(sw.values) if values is None else values
    option = sw.option or param
    rows = [Row(label=f"{param}={v}", method=spec.method or "student", options={option: v}) for v in values]
    return Group(name=param, model=spec.model or "", rows=rows)


def sweep_groups(spec: Spec) -> list[Group]:
    return [sweep_group(spec, p) for p in spec.sweeps]


def sweep_spec(spec: Spec, param: str, values: list[Any] | None = None) -> Spec:
    """The sweep spec restricted to one parameter: a table with one group."""
    return dataclasses.replace(spec, groups=[sweep_group(spec, param, values)])


def parse_sweep_values(spec: Spec, param: str, text: str | None) -> list[Any]:
    """`--values 0.1,0.5` -> numbers, checked against the parameter's domain (one-line errors)."""
    sw = spec.sweep(param)
    if text is None:
        return list(sw.values)
    values: list[Any] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        try:
            values.append(int(tok) if sw.integer else float(tok))
        except ValueError:
            kind = "integers" if sw.integer else "numbers"
            raise ConfigError(f"--values for {param} expects comma-separated {kind}, got {tok!r}") from None
    if not values:
        raise ConfigError(f"--values for {param} is empty")
    lo, hi = sw.domain
    for v in values:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{param}={v} is out of range [{lo if lo is not None else '-inf'}, "
                              f"{hi if hi is not None else 'inf'}]")
    method = METHODS.get(spec.method)  # the method's own Options validation
    for v in values:
        method.parse_options({**spec.method_options(spec.method), sw.option or param: v})
    return values


def sweep_log(results: Path, table: str, preset: str) -> Path:
    return Path(results) / f"{table}-{preset}.sweeps.json"


def _logged_values(results: Path, table: str, preset: str) -> dict[str, list[Any]]:
    """Values `ablate` ran beyond the spec's, per parameter ({} when absent or unreadable)."""
    path = sweep_log(results, table, preset)
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except StorageError:
        return {}
    return data if isinstance(data, dict) else {}


def record_sweep_values(results: Path, table: str, preset: str, param: str, values: list[Any]) -> None:
    """Remember values run by `sdesbench ablate` beyond the spec's, so `report` plots them."""
    known = _logged_values(results, table, preset)
    known[param] = sorted(set(known.get(param, [])) | set(values))
    write_json(sweep_log(results, table, preset), known)


def sweep_values(spec: Spec, results: Path, preset: str, param: str) -> list[Any]:
    """The spec's values for a parameter plus any `ablate` added (sorted)."""
    logged = _logged_values(results, spec.name, preset).get(param, [])
    return sorted(set(spec.sweep(param).values) | set(logged))
