"""Runs every eval of tests/promql/*.test (Prometheus' test-script format) as one test."""

from __future__ import annotations

from pathlib import Path

import pytest

from m3shm.query.engine import Engine
from m3shm.query.script import Case, Load, build_store, check_case, parse_script
from m3shm.query.storage import MemoryStore

SCRIPTS = sorted((Path(__file__).parent / "promql").glob("*.test"))


def _cases() -> list[Case]:
    out = []
    for path in SCRIPTS:
        out.extend(parse_script(path.read_text(), str(path)))
    return out


CASES = _cases()
_STORES: dict[int, tuple[list[Load], MemoryStore]] = {}


def _store(loads: list[Load]) -> MemoryStore:
    key = id(loads)
    hit = _STORES.get(key)
    if hit is None or hit[0] is not loads:
        hit = (loads, build_store(loads))
        _STORES[key] = hit
    return hit[1]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_script_case(case: Case) -> None:
    problems = check_case(case, Engine(_store(case.loads)))
    assert not problems, f"{case.path}:{case.line}: {case.expr}\n  " + "\n  ".join(problems)


def test_scripts_exist() -> None:
    assert len(SCRIPTS) >= 5 and len(CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_script_case_in_small_chunks(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same cases with range functions run over chunks of a few samples each."""
    from m3shm.query import rangefuncs

    monkeypatch.setattr(rangefuncs, "CHUNK_SAMPLES", 3)
    problems = check_case(case, Engine(_store(case.loads)))
    assert not problems, f"{case.path}:{case.line}: {case.expr}\n  " + "\n  ".join(problems)
