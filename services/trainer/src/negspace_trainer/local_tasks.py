"""The lm-eval tasks this repository ships (``tasks/<name>/<name>.yaml`` + JSONL data).

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset`` unchanged, so a relative
path would be read from the current directory. ``materialize`` therefore writes a copy of each
task YAML whose data files are absolute paths into the shipped folder; that copy is what lm-eval's
``TaskManager(include_path=...)`` reads, wherever the repository or the wheel is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class ShippedTask:
    name: str
    yaml_path: Path
    config: dict[str, Any]
    description: str | None
    num_docs: int | None


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _absolute_data_files(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return config

    def fix(p: str) -> str:
        path = Path(p)
        return str(path if path.is_absolute() else (folder / path).resolve())

    if isinstance(files, str):
        fixed: Any = fix(files)
    elif isinstance(files, list):
        fixed = [fix(f) for f in files]
    else:
        fixed = {split: ([fix(f) for f in v] if isinstance(v, list) else fix(v)) for split, v in files.items()}
    return {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": fixed}}


def shipped_tasks(root: Path = TASKS_DIR) -> list[ShippedTask]:
    tasks = []
    for yaml_path in sorted(root.glob("*/*.yaml")):
        config = yaml.safe_load(yaml_path.read_text())
        if not isinstance(config, dict) or "task" not in config:
            continue
        config = _absolute_data_files(config, yaml_path.parent)
        files = config.get("dataset_kwargs", {}).get("data_files")
        test_split = config.get("test_split")
        num_docs = None
        if isinstance(files, dict) and isinstance(files.get(test_split), str):
            num_docs = _count_lines(Path(files[test_split]))
        tasks.append(ShippedTask(name=config["task"], yaml_path=yaml_path, config=config,
                                 description=(config.get("metadata") or {}).get("description"),
                                 num_docs=num_docs))
    return tasks


def shipped_task_names() -> list[str]:
    return [t.name for t in shipped_tasks()]


def materialize(dest: Path) -> Path:
    """Write every shipped task's YAML, with absolute data paths, into ``dest``; return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for task in shipped_tasks():
        target = dest / f"{task.name}.yaml"
        tmp = target.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(task.config, sort_keys=False))
        tmp.replace(target)
    return dest
