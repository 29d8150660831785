"""Counters of the fault suite (tests/test_faults*.py), printed as one line at the end of the pytest run by
tests/conftest.py: how many faults and bad inputs were tried, how many completed checkpoints were lost, and how many
stack traces a user would have seen."""

from __future__ import annotations

from collections import Counter

faults: Counter = Counter()       # kind -> times injected
bad_inputs: Counter = Counter()   # kind -> times fed
checkpoints = {"checked": 0, "lost": 0}
outputs = {"checked": 0, "tracebacks": 0}


def fault(kind: str, n: int = 1) -> None:
    faults[kind] += n


def bad_input(kind: str, n: int = 1) -> None:
    bad_inputs[kind] += n


def checkpoint(intact: bool) -> bool:
    """Record one check that a completed checkpoint survived a fault; returns `intact` (for an assert)."""
    checkpoints["checked"] += 1
    checkpoints["lost"] += 0 if intact else 1
    return intact


def output(*texts: str) -> bool:
    """Record one check of what a user saw (stdout/stderr); True if it holds no stack trace."""
    n = sum((t or "").count("Traceback (most recent call last)") for t in texts)
    outputs["checked"] += 1
    outputs["tracebacks"] += n
    return n == 0


def summary_lines():
    if not faults and not bad_inputs:
        return []
    return [
        f"fault suite: {sum(faults.values())} faults and {sum(bad_inputs.values())} bad inputs tried, "
        f"{checkpoints['lost']} checkpoints lost (of {checkpoints['checked']} checked), "
        f"{outputs['tracebacks']} tracebacks shown (in {outputs['checked']} outputs checked)",
        "  faults: " + ", ".join(f"{k} x{v}" for k, v in sorted(faults.items())),
        "  bad inputs: " + ", ".join(f"{k} x{v}" for k, v in sorted(bad_inputs.items())),
    ]
