"""The controller's benchmarks (they import the controller's code; ``make bench-controller`` runs
``latency`` then ``large``): ``latency`` (index and service latency, exact mode), ``large``
(approximate mode against exact, and at 10^5-10^6 points), ``engines`` (the embedded Qdrant
engines side by side), ``embed`` (embedder texts/s, torch vs ONNX Runtime). Each records its
section of docs/benchmarks.md."""
