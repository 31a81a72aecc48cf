"""The versions each patch in ``nemo_upcycle/compat/`` was written for, checked before it is applied.

The patches change megatron-core's and NeMo's internals (private functions, the behaviour of
one release, down to line numbers): on another version they would fail somewhere deep, or
silently do something else. So each one states here the distributions whose internals it
changes and the version it was written for, and calls :func:`require` before it touches
anything; any other version installed is a :class:`VersionMismatch` (a user error: one
message, exit status 2) naming the package, the version found, the version written for and
the fix. When the versions match, :func:`require` does nothing.

A version is exact (``"0.15.3"``) or a release line (``"2.7.*"``: 2.7.0, 2.7.3, and the
pre-release and local builds of the line that NGC containers carry, such as ``2.7.0rc1`` or
``0.15.0+nv25.10``). The patches applied only on a CPU-only machine, which is installed from
constraints.txt, are exact; the hooks the training job applies on every machine, the GPU
containers included, name the release line pyproject.toml admits.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from nemo_upcycle.errors import UserError


@dataclass(frozen=True)
class Patch:
    what: str  # what it patches, and where it lives
    written_for: dict  # distribution -> exact version or release line ("2.7.*")


PATCHES = {
    "cpu": Patch("megatron-core on a CPU-only torch (nemo_upcycle/compat/cpu.py)",
                 {"megatron-core": "0.15.3"}),
    "nemo_cpu": Patch("NeMo's trainer and megatron-core's distributed optimizer on a CPU-only torch "
                      "(nemo_upcycle/compat/nemo_cpu.py)",
                      {"nemo-toolkit": "2.7.3", "megatron-core": "0.15.3"}),
    "nemo_strategy": Patch("the training job's hooks into NeMo's MegatronStrategy (nemo_upcycle/compat/nemo_strategy.py)",
                           {"nemo-toolkit": "2.7.*", "megatron-core": "0.15.*"}),
    # Test harness (not in the wheel): NeMo's own Hugging Face importer run on a CPU.
    "nemo_importer": Patch("NeMo's HFLlamaImporter on a CPU (tests/support/nemo_import.py)",
                           {"nemo-toolkit": "2.7.3"}),
}


class VersionMismatch(UserError):
    """An installed package is not the version a patch of its internals was written for."""


def installed_version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def matches(found: Optional[str], written_for: str) -> bool:
    """PEP 440 ``==written_for`` (a ``.*`` line admits pre-releases and local builds)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    if found is None:
        return False
    try:
        return SpecifierSet(f"=={written_for}").contains(found, prereleases=True)
    except InvalidVersion:
        return False


def _wanted(written_for: str) -> str:
    return f"a {written_for[:-2]}.x release" if written_for.endswith(".*") else written_for


def require(patch: str) -> None:
    """Refuse (:class:`VersionMismatch`) unless every package ``patch`` changes is the version it was written for."""
    entry = PATCHES[patch]
    installed = {dist: installed_version(dist) for dist in entry.written_for}
    wrong = [(dist, installed[dist], wanted) for dist, wanted in entry.written_for.items()
             if not matches(installed[dist], wanted)]
    if not wrong:
        return
    found = "; ".join(f"{dist} {version} is installed" if version else f"{dist} has no installed version "
                      "(no distribution metadata)" for dist, version, _ in wrong)
    written = ", ".join(f"{dist} {_wanted(wanted)}" for dist, _, wanted in wrong)
    exact = " ".join(f"'{dist}=={wanted}'" for dist, _, wanted in wrong if not wanted.endswith(".*"))
    raise VersionMismatch(
        f"{found}, but {entry.what} was written for {written}: it changes that release's internals "
        "and would fail, or silently compute something else, on another version. Install the versions "
        "nemo-upcycle is tested with, pinned in its constraints.txt (pip install -c constraints.txt nemo-upcycle"
        + (f", or pip install {exact}" if exact else "") + ")")
