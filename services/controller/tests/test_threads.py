"""One BLAS thread on the request path; every core while bulk work runs; back to one after."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from negspace_controller import threads
from negspace_controller.settings import ControllerSettings
from threadpoolctl import threadpool_info


def blas_threads() -> set[int]:
    np.ones(2) @ np.ones(2)  # numpy's OpenBLAS is loaded
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture
def restore():
    before = threads._request_threads
    yield
    threads._request_threads = before
    threads._limit(os.cpu_count() or 1)


async def test_request_path_has_one_thread_and_bulk_work_every_core(monkeypatch, restore):
    monkeypatch.setattr(threads, "bulk_threads", lambda: 2)  # this machine may have one core
    threads.configure(1)
    assert blas_threads() == {1}
    async with threads.bulk():
        assert blas_threads() == {2}
        # what the service does: the bulk work itself runs in a worker thread
        assert await asyncio.to_thread(blas_threads) == {2}
        async with threads.bulk():  # nested: still raised, and not lowered by the inner exit
            assert blas_threads() == {2}
        assert blas_threads() == {2}
    assert blas_threads() == {1}
    assert await asyncio.to_thread(blas_threads) == {1}
    # two overlapping bulk blocks (two requests): lowered only when the last one ends
    inside, release = asyncio.Event(), asyncio.Event()

    async def other() -> None:
        async with threads.bulk():
            inside.set()
            await release.wait()

    task = asyncio.create_task(other())
    await inside.wait()
    async with threads.bulk():
        pass
    assert blas_threads() == {2}
    release.set()
    await task
    assert blas_threads() == {1}
    with pytest.raises(RuntimeError):  # an exception inside a bulk block lowers it too
        async with threads.bulk():
            raise RuntimeError("boom")
    assert blas_threads() == {1}


async def test_the_setting_reaches_the_process(run_app, restore):
    async with run_app(ControllerSettings(embedder="fake", qdrant_path=":memory:", blas_threads=2)):
        assert blas_threads() == {min(2, os.cpu_count() or 1)}  # OpenBLAS caps it at the cores it found
    async with run_app(ControllerSettings(embedder="fake", qdrant_path=":memory:")):
        assert blas_threads() == {1}  # the default
