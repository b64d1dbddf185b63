"""The trainer's benchmarks: ``bench`` (make bench-trainer: LoRA vs full fine-tuning) and
``bench_eval`` (make bench-eval: does the eval task see what the data teaches?). Each run is one
``negspace_trainer.worker`` job, as the service runs them."""
