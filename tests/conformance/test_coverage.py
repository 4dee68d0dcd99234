"""Every registered method is checked against its public reference code, or says why it cannot be: a
new method cannot be added without a conformance fixture (tests/conformance/<fixture>.json) naming it."""
from __future__ import annotations

import json
import re
from pathlib import Path

from sdesbench.methods import METHODS

HERE = Path(__file__).resolve().parent
# methods with no public reference loss of their own to compare against, and why
NO_PUBLIC_REFERENCE = {
    "student": "plain cross-entropy (torch's own, checked in tests/test_selfkd.py)",
    "sdes": "the SDES authors published no code; its terms are checked against hand computations (tests/test_sdes.py)",
    "sdes-no-dfed": "an SDES ablation (as sdes)",
    "sdes-no-dped": "an SDES ablation (as sdes)",
    "sdes-random-split": "an SDES ablation (as sdes)",
    "rdd+kl": "the sum of rdd and kl, each checked against its reference",
    "rdd+cwd": "the sum of rdd and cwd, each checked against its reference",
    "fitnet+kd": "the sum of fitnet and kl, each checked against its reference",
}


def covered_methods() -> dict[str, str]:
    """method -> the fixture that checks it (a fixture's `method` names one or several, comma-separated)."""
    out = {}
    for path in sorted(HERE.glob("*.json")):
        for name in json.loads(path.read_text())["method"].split(","):
            out[name.strip()] = path.name
    return out


def test_every_registered_method_has_a_conformance_fixture_or_a_reason():
    covered = covered_methods()
    unchecked = [m for m in METHODS.names() if m not in covered and m not in NO_PUBLIC_REFERENCE]
    assert not unchecked, f"methods without a conformance fixture or a reason: {unchecked}"
    assert not set(covered) - set(METHODS.names()), "a fixture names an unregistered method"
    assert not set(NO_PUBLIC_REFERENCE) & set(covered), "a method listed as unreferenced has a fixture"


def test_the_readme_lists_every_registered_method():
    readme = (HERE.parent.parent / "README.md").read_text()
    paragraph = next(p for p in readme.split("\n\n") if p.startswith("`sdesbench list methods`:"))
    listing = paragraph.split(":", 1)[1].split(".\n", 1)[0]  # up to the sentence's end
    assert sorted(re.findall(r"`([^`]+)`", listing)) == METHODS.names()
