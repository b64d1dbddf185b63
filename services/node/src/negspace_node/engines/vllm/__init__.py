"""The production engine: vLLM (V1) with classifier-free guidance across rows.

- ``processor.CFGLogitsProcessor``: a cross-row V1 logits processor; for every complete group in
  the batch it combines the positive's and the negatives' logits (``negspace_node.guidance``),
  draws one token and forces it on every member row.
- ``scheduler.GangScheduler``: admits a waiting group only whole and never lets preemption split one.
- ``engine.VLLMEngine``: one in-process vLLM engine driven by one thread; adds all members of a
  group between two steps, stops the group when the positive stops, checks members agree.

Nothing here imports vllm at package import time; import the submodules explicitly.
"""
