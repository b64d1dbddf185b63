"""negspace orchestrator: runs guided and baseline generation over the node and controller
services, persists every attempt in SQLite, converts instructions to Q/A and hands them to the
trainer."""

__version__ = "0.1.0"
