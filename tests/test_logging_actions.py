"""The log actions are an interface: docs/logging.md lists exactly those the code logs."""

from __future__ import annotations

import re
from pathlib import Path

from deferq.models import AttemptOutcome

ROOT = Path(__file__).resolve().parent.parent


def documented_actions() -> set[str]:
    text = (ROOT / "docs" / "logging.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))


def logged_actions() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "src" / "deferq").rglob("*.py"):
        found |= set(re.findall(r'"action": "([a-z_]+)"', path.read_text()))
        if 'f"attempt_{outcome.value}"' in path.read_text():
            # the worker logs one action per way an attempt can end
            found |= {f"attempt_{o.value}" for o in AttemptOutcome if o != AttemptOutcome.RUNNING}
    return found


def test_every_logged_action_is_documented_and_every_documented_one_is_logged() -> None:
    documented = documented_actions()
    logged = logged_actions()
    assert logged, "no action found in the source: the pattern no longer matches"
    assert logged - documented == set(), "logged but not in docs/logging.md"
    assert documented - logged == set(), "in docs/logging.md but never logged"
