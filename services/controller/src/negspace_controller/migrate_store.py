"""``python -m negspace_controller.migrate_store FOLDER``: a qdrant-client local-mode store, moved
to the edge engine in place.

Stop the controller first (the folder's lock refuses otherwise). FOLDER is renamed to
``FOLDER.local-mode`` (the backup, kept: delete it once the controller runs well), every
collection in it is copied into a new edge store at FOLDER (ids, vectors, payloads with ``text``
and ``_seq``, vector size, embedder) and the counts compared. The neighbour-list snapshots
(``FOLDER-index``) stay valid, since the points and their insertion sequences are the same, so
the next start does not rebuild them. If anything fails, the partial edge folder is removed and
the backup moved back. It costs about one local-mode read of every point plus an edge bulk load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from negspace_controller.store import is_local_mode_folder
from negspace_controller.store_edge import EdgeStore
from negspace_controller.store_qdrant import LocalStore

BATCH = 2048


def migrate(folder: str | Path, backup: str | Path | None = None,
            say: Callable[[str], None] = print) -> dict[str, int]:
    """Move the local-mode store at ``folder`` to edge (see the module doc): {collection: points}."""
    folder = Path(folder)
    backup = Path(backup) if backup else folder.with_name(folder.name + ".local-mode")
    if not is_local_mode_folder(folder):
        raise ValueError(f"{folder} does not hold a qdrant-client local-mode store (no meta.json)")
    if backup.exists():
        raise ValueError(f"{backup} exists: move it away or pass another --backup")
    LocalStore(str(folder), prefix="").close()  # in use by a running controller? (RuntimeError)
    os.replace(folder, backup)
    src = dst = None
    counts: dict[str, int] = {}
    try:
        src = LocalStore(str(backup), prefix="")
        dst = EdgeStore(str(folder), prefix="", flush_interval_s=None)  # close flushes
        for name in src.names():
            started = time.monotonic()
            dim, embedder = src.dimension(name)
            dst.create(name, dim, embedder, src.owner(name))  # type: ignore[arg-type]  (None: recorded as unknown)
            keys, vecs, payloads = [], [], []
            for key, vec, payload in src.scan(name, with_vectors=True, batch=BATCH):
                keys.append(key)
                vecs.append(vec)
                payloads.append(payload)
                if len(keys) == BATCH:
                    dst.upsert(name, keys, vecs, payloads)  # type: ignore[arg-type]
                    keys, vecs, payloads = [], [], []
            if keys:
                dst.upsert(name, keys, vecs, payloads)  # type: ignore[arg-type]
            want, got = src.count(name), dst.count(name)
            if want != got:
                raise RuntimeError(f"collection {name!r}: {want} points in local mode, {got} copied")
            counts[name] = got
            say(f"[migrate] {name}: {got} points, {dim} dims ({time.monotonic() - started:.1f} s)")
        dst.close()
        dst = None
    except BaseException:
        if dst is not None:
            dst.close()
        if src is not None:
            src.close()
            src = None
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(backup, folder)
        say(f"[migrate] failed: {folder} is the local-mode store it was")
        raise
    finally:
        if src is not None:
            src.close()
    say(f"[migrate] {folder} is an edge store now ({len(counts)} collections); the local-mode store is kept "
        f"in {backup}: delete it once the controller runs well")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m negspace_controller.migrate_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the controller's --qdrant-path (default $NEGSPACE_HOME/qdrant)")
    p.add_argument("--backup", help="where the local-mode store goes (default FOLDER.local-mode)")
    a = p.parse_args(argv)
    try:
        migrate(a.folder, a.backup)
    except (ValueError, RuntimeError) as exc:
        print(f"migrate_store: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
