"""Loaded first in every pytest session (the repository root's conftest).

ONNX Runtime is imported here, before any test module, because the whole suite runs in one
process: loading ``onnxruntime``'s native module after the libraries other tests load first
(torch, grpc, pyarrow, scikit-learn ...) crashed the process with a segfault inside
onnxruntime's pybind initialisation (seen when the controller's ONNX tests ran after ~55 other
controller tests). A service process loads only the few libraries its backend needs and is not
affected: the controller's manifest start imports no torch, its fallback imports torch and then
onnxruntime, and both are exercised in fresh processes by services/controller/tests.
"""

import onnxruntime  # noqa: F401  (load order: see above)
