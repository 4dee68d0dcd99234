"""Every registered method is checked against its public reference code, or says why it cannot be: each
method's class names its fixture (`conformance`, a file here whose `method` names it) or gives the reason it
has none (`no_conformance_because`). Nothing here lists methods: a new one is covered by its class alone."""
from __future__ import annotations

import json
from pathlib import Path

from sdesbench.methods import METHODS

HERE = Path(__file__).resolve().parent


def fixture_methods() -> dict[str, list[str]]:
    """fixture file -> the methods it checks (a fixture's `method` names one or several, comma-separated)."""
    return {path.name: [n.strip() for n in json.loads(path.read_text())["method"].split(",")]
            for path in sorted(HERE.glob("*.json"))}


def test_every_registered_method_has_a_conformance_fixture_or_a_reason():
    fixtures = fixture_methods()
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert "conformance" in vars(cls), f"{name}: its class does not declare `conformance` (a fixture or None)"
        if cls.conformance is None:
            assert vars(cls).get("no_conformance_because", "").strip(), f"{name}: no fixture and no reason of its own"
        else:
            assert cls.conformance in fixtures, f"{name}: its fixture {cls.conformance} is not in {HERE}"
            assert name in fixtures[cls.conformance], f"{name}: {cls.conformance} does not check it"
    for fixture, names in fixtures.items():
        for name in names:
            assert name in METHODS, f"{fixture} names the unregistered method {name!r}"
            assert METHODS.get(name).conformance == fixture, f"{fixture} checks {name}, whose class does not name it"

