"""Smoke test of the GPU node image (negspace-node:gpu) on a machine WITHOUT a GPU: `make
test-gpu-image` runs it inside the container (as the image's non-root user) with the node's tests
mounted read-only. Each step prints one line; the first failure exits non-zero.

1. the locked packages import: vllm 0.32 (CUDA build), its torch, transformers
2. the guidance math (tests/test_guidance.py) and the logits processor + gang scheduler built
   against this vLLM's real classes (tests/test_vllm_units.py: BatchUpdate, MoveDirectionality,
   SamplingParams.extra_args, the V1 processor interface), on CPU tensors
3. the C compiler Triton looks for (CC, else gcc, else clang) compiles and loads a module against
   Python.h through Triton's own build function (what its CUDA driver module needs on first use)
4. `python -m negspace_node` with NODE_ENGINE=vllm refuses for want of a GPU: exit code 3, a
   message naming the reason, no traceback

What it cannot show: anything that runs on a GPU (the model, CUDA kernels, Triton/flashinfer JIT
for a real device). README "GPU node image" says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

TESTS = os.environ.get("SMOKE_TESTS", "/smoke/services/node/tests")


def step(msg: str) -> None:
    print(f"[smoke] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[smoke] FAILED: {msg}", flush=True)
    sys.exit(1)


def packages() -> None:
    import torch
    import transformers
    import vllm

    if not vllm.__version__.startswith("0.32."):
        fail(f"vllm {vllm.__version__}, the lock says 0.32.*")
    step(f"1 imports: vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
         f"transformers {transformers.__version__}; a GPU visible: {torch.cuda.is_available()}")
    if torch.version.cuda is None:
        fail("this torch has no CUDA: the image must carry the CUDA build vllm pins")


def tests() -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        "--import-mode=importlib", f"{TESTS}/test_guidance.py", f"{TESTS}/test_vllm_units.py"],
                       cwd="/tmp", capture_output=True, text=True)
    tail = "\n".join(r.stdout.strip().splitlines()[-25:])
    if r.returncode != 0:
        print(tail, r.stderr[-3000:], sep="\n")
        fail("the guidance math / processor tests")
    step(f"2 guidance math + processor against this vLLM's classes: {r.stdout.strip().splitlines()[-1]} "
         f"({time.monotonic() - t0:.0f} s)")


PROBE = r"""
#include <Python.h>
static struct PyModuleDef probe = {PyModuleDef_HEAD_INIT, "negspace_cc_probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_negspace_cc_probe(void) {
    PyObject *m = PyModule_Create(&probe);
    if (m != NULL) PyModule_AddIntConstant(m, "answer", 42);
    return m;
}
"""


def compiler() -> None:
    from triton.runtime.build import compile_module_from_src

    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")  # Triton's own order
    if cc is None:
        fail("no C compiler: Triton would fail with 'Failed to find C compiler'")
    mod = compile_module_from_src(PROBE, "negspace_cc_probe")
    if mod.answer != 42:
        fail("the compiled probe module does not answer")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    step(f"3 Triton's compiler: {cc} ({version}) built and loaded a module against Python.h")


def refuses_without_gpu() -> None:
    env = dict(os.environ, NODE_ENGINE="vllm", NODE_PORT="18001", NEGSPACE_API_TOKEN="smoke",
               HF_HUB_OFFLINE="1", NODE_ENGINE_ERROR_GRACE_S="1")
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "negspace_node"], env=env, capture_output=True, text=True,
                           timeout=600)
    except subprocess.TimeoutExpired:
        fail("the node neither started nor refused within 600 s")
    out = r.stdout + r.stderr
    lines = [ln for ln in out.splitlines() if "refused" in ln or "no device" in ln or "engine died" in ln]
    if r.returncode != 3 or "no NVIDIA GPU is visible" not in out or "Traceback" in out:
        print(out[-4000:])
        fail(f"the node should refuse for want of a GPU with exit code 3 and no traceback (exit {r.returncode})")
    step(f"4 the node refuses without a GPU (exit 3, {time.monotonic() - t0:.0f} s, no traceback): {lines[0].strip()}")


if __name__ == "__main__":
    packages()
    tests()
    compiler()
    refuses_without_gpu()
    step("passed")
