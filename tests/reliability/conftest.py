"""Shared fixtures of the reliability tests (importlib mode: helpers live here as fixtures).

``running``: ``async with running(app) as client`` runs a real app's lifespan and gives an httpx
client bound to it in-process (``negspace_servekit.testing.in_process``).

``fuzz_record``: a module-scoped recorder of what the fuzzed app answered, per operation and
generation mode (positive = valid by the schema, negative = deliberately invalid); the table is
printed when the module ends (run pytest with ``-s`` to see it; docs/reliability.md quotes it).
"""

from __future__ import annotations

import functools
import os
from collections import Counter

import pytest
from negspace_servekit.testing import in_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fuzz_record(request):
    seen: Counter = Counter()

    def record(case, response, variant: str = "") -> None:
        meta = getattr(case, "_meta", None)
        mode = getattr(getattr(getattr(meta, "generation", None), "mode", None), "value", "?")
        op = f"{case.method.upper()} {case.path}{variant}"
        seen[(op, mode, response.status_code)] += 1

    yield record
    if seen:
        lines = [f"\n--- fuzz statuses: {request.module.__name__} ---"]
        by_op: dict[tuple[str, str], list[str]] = {}
        for (op, mode, status), n in sorted(seen.items()):
            by_op.setdefault((op, mode), []).append(f"{status}x{n}")
        for (op, mode), counts in sorted(by_op.items()):
            lines.append(f"{op:55s} {mode:9s} {' '.join(counts)}")
        print("\n".join(lines))


@pytest.fixture
def running():
    return functools.partial(in_process, base_url="http://svc", timeout=30)
