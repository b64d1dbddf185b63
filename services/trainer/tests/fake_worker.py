"""A stand-in for ``python -m negspace_trainer.worker JOB_DIR`` in lifecycle tests: no model, no
training, the same files. Appends the job's folder name to ``$FAKE_WORKER_ORDER`` (which jobs ran,
in which order), writes ``progress.json``, waits while ``$FAKE_WORKER_GATE`` names a file that does
not exist yet (so a test can stop the trainer mid-job), then writes ``result.json``."""

import json
import os
import sys
import time
from pathlib import Path

job_dir = Path(sys.argv[1])
if os.environ.get("FAKE_WORKER_ORDER"):
    with open(os.environ["FAKE_WORKER_ORDER"], "a") as fh:
        fh.write(job_dir.name + "\n")
(job_dir / "progress.json").write_text(json.dumps({"stage": "training", "step": 1, "total_steps": 2,
                                                   "losses": [{"step": 1, "loss": 1.5}]}))
print("fake worker: step 1/2", flush=True)
gate = os.environ.get("FAKE_WORKER_GATE")
while gate and not Path(gate).exists():
    time.sleep(0.05)
(job_dir / "progress.json").write_text(json.dumps({"stage": "done", "step": 2, "total_steps": 2,
                                                   "losses": [{"step": 1, "loss": 1.5},
                                                              {"step": 2, "loss": 1.0}]}))
(job_dir / "result.json").write_text(json.dumps({"eval": {}, "metrics": {"fake": True}}))
print("fake worker: succeeded", flush=True)
