"""xbmd.stages.run_cases: every item gets a result, a dead worker only fails its own item."""

from __future__ import annotations

import os
import time

from xbmd.stages import run_cases


def _square_or_die(item: int) -> tuple[str, int]:
    """Work of the test: the worker process running item 1 dies (as when killed or out of
    memory); item 2 raises; the others return their square, slowly enough to overlap."""
    time.sleep(0.3)
    if item == 1:
        os._exit(9)
    if item == 2:
        raise ValueError("bad item")
    return "ok", item * item


def _crashed(item: int, exc: BaseException) -> tuple[str, int]:
    return type(exc).__name__, item


def test_in_this_process_a_raising_item_is_recorded():
    results = list(run_cases([0, 2, 3], _square_or_die, _crashed, workers=1))  # no item 1 here
    assert results == [("ok", 0), ("ValueError", 2), ("ok", 9)]


def test_a_dead_worker_fails_only_its_item():
    """Five items on two spawned workers: item 1's process dies while item 0 (and then others)
    run beside it; only item 1 is a crash, every other item has its own result."""
    results = list(run_cases(list(range(5)), _square_or_die, _crashed, workers=2))
    assert sorted(results, key=lambda r: r[1]) == [
        ("ok", 0),
        ("BrokenProcessPool", 1),
        ("ValueError", 2),
        ("ok", 9),
        ("ok", 16),
    ]
