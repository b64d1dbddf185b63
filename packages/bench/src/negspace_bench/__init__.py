"""Whole-stack benchmarks: ``python -m negspace_bench.load`` (``make bench-load``) and
``python -m negspace_bench.scale`` (``make bench-scale``). They start the services through the CLI's
launcher and call each service's own endpoints to time them, which is why they live outside the CLI
(its commands reach every service through the orchestrator alone)."""
