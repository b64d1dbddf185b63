"""The node's benchmarks: ``bench`` (make bench-node: the engines against the reference loop),
``bench_dtype`` (make bench-dtype: float32 vs bfloat16 on the vLLM CPU engine) and
``bench_guidance`` (make bench-guidance: the guidance logits processor per decode step). They use
the node's engines in-process, so they live here, above the service."""
