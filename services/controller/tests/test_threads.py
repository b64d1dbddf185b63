"""--blas-threads reaches OpenBLAS (one thread by default) and /health reports what OpenBLAS gives.

Each case runs in a fresh interpreter: the controller sets the count once, at start-up, in its
own process, and a test process that has run other tests' BLAS work is not that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import asyncio, json, sys
from threadpoolctl import threadpool_info
from negspace_controller.app import create_app
from negspace_controller.testing import HashingFakeEmbedder
from negspace_controller.settings import ControllerSettings
from negspace_servekit.testing import in_process

async def main():
    kw = json.loads(sys.argv[1])
    app = create_app(ControllerSettings(qdrant_path=":memory:", **kw), embedder=HashingFakeEmbedder())
    async with in_process(app, "http://c") as c:
        health = (await c.get("/health")).json()["info"]
    blas = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
    print(json.dumps({"health": health["blas_threads"], "blas": blas}))

asyncio.run(main())
"""


def start(**settings) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(settings)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("asked,want", [(None, 1), (2, 2)])
def test_the_setting_reaches_openblas_and_health_reports_it(asked, want):
    want = min(want, os.cpu_count() or 1)  # OpenBLAS caps it at the cores it found
    got = start(**({} if asked is None else {"blas_threads": asked}))
    assert got == {"health": want, "blas": [want]}
