"""EngineThread (ember.distributed.ray_data): every engine call of an actor runs on one
thread, whichever thread calls it (Ray calls an actor's constructor and its methods from
different threads; libgomp keeps one OpenMP pool per calling thread). No Ray, no model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ember.distributed.ray_data import EngineThread


def test_calls_from_any_thread_run_on_one_thread() -> None:
    engine = EngineThread()
    try:
        caller = threading.get_ident()
        first = engine.run(threading.get_ident)
        with ThreadPoolExecutor(4) as pool:
            others = list(pool.map(lambda _: engine.run(threading.get_ident), range(8)))
        assert first != caller
        assert set(others) == {first}
        assert engine.run(lambda a, b=0: a + b, 2, b=3) == 5
    finally:
        engine.close()


def test_exception_reaches_the_caller() -> None:
    engine = EngineThread()
    try:
        with pytest.raises(ValueError, match="bad row"):
            engine.run(lambda: (_ for _ in ()).throw(ValueError("bad row")))
        assert engine.run(lambda: "still serving") == "still serving"
    finally:
        engine.close()
