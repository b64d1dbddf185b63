"""``negspace export RUN_ID --format hf|parquet|jsonl --out DIR [--push-to-hub REPO]``.

The orchestrator builds the export (``GET /runs/{id}/export``: a tar of the folder, its dataset
card included); this unpacks it into ``DIR`` on this machine, and optionally uploads ``DIR`` to a
Hugging Face Hub dataset repository with the token ``huggingface_hub`` finds (``$HF_TOKEN`` or
``huggingface-cli login``).
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from negspace_contracts.orchestrator import OrchestratorClient


class ExportError(RuntimeError):
    pass


def unpack(archive: bytes, out: Path) -> list[Path]:
    """Unpack the orchestrator's tar into ``out`` (members that would land outside it are refused)."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
        names = tar.getnames()
    return [out / n for n in names]


async def export_run(client: OrchestratorClient, run_id: str, fmt: str, out: Path, *,
                     license: str = "other", quiet: bool = False) -> list[Path]:
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: give a new or empty folder")
    if not quiet:
        print(f"negspace: exporting run {run_id} ({fmt}) ...", file=sys.stderr, flush=True)
    archive = await client.runs.export_archive(run_id, fmt, license=license)  # type: ignore[arg-type]
    files = unpack(archive, out)
    if not quiet:
        print(f"negspace: wrote {len(files)} files to {out} (dataset card: {out / 'README.md'})",
              file=sys.stderr, flush=True)
    return files


def push_to_hub(folder: Path, repo: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload ``folder`` to the dataset repository ``repo``; return its URL. Needs a token."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ExportError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)") from exc
    token = token or huggingface_hub.get_token()
    if not token:
        raise ExportError("--push-to-hub needs a Hugging Face token: set $HF_TOKEN or run `huggingface-cli login`")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                      commit_message="negspace export")
    return f"https://huggingface.co/datasets/{repo}"
