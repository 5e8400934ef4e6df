"""What serving deploys is exactly what the registry pinned: SHA-256 checks of an export's artifacts, and the pins
file (``.pins.json``) that carries them to the unpacked export staged on disk.

A registry version records the SHA-256 of each artifact it was built from (model.pt, model_config.json, labels.json,
the tokenizer archive). Every fetch checks the downloaded bytes against those digests before anything is unpacked;
the unpacked export then gets a pins file listing the registry's digests and every file's own digest, so each later
deploy or reload checks the files on disk against the registry's pins without fetching them again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.errors import FailedPrecondition
from services.mesh.files import sha256_file, write_private

__all__ = ["PINS_FILE", "ExportPins", "check_artifact", "export_files", "is_sha256", "seal_export", "verify_export"]

PINS_FILE = ".pins.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value))


@dataclass(frozen=True)
class ExportPins:
    """The registry's digest of each artifact (by role) and the digest of each file of the unpacked export (by
    '/'-separated path relative to the export)."""

    artifacts: Mapping[str, str]
    files: Mapping[str, str]


def check_artifact(path: Path, pinned: str, what: str) -> None:
    """FailedPrecondition unless the file's SHA-256 is ``pinned``."""
    actual = sha256_file(path)
    if actual != pinned:
        raise FailedPrecondition(
            f"{what} does not match the registry: its SHA-256 is {actual}, the registry pinned {pinned}; "
            "nothing was deployed"
        )


def export_files(root: Path) -> dict[str, str]:
    """Every file of the export under ``root`` (the pins file left out) with its SHA-256. An export holds regular
    files and directories only: a link or anything else is refused, so nothing in it can point outside it."""
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise FailedPrecondition(f"the export holds {relative!r}, which is not a regular file or directory")
        if path.is_file() and relative != PINS_FILE:
            files[relative] = sha256_file(path)
    return files


def seal_export(root: Path, artifacts: Mapping[str, str]) -> ExportPins:
    """Writes the pins file of an export whose artifacts were checked against ``artifacts`` (role -> SHA-256)."""
    pins = ExportPins(dict(artifacts), export_files(root))
    text = json.dumps({"artifacts": pins.artifacts, "files": pins.files}, indent=1, sort_keys=True)
    write_private(root / PINS_FILE, text.encode())
    return pins


def verify_export(root: Path, artifacts: Mapping[str, str] | None = None) -> ExportPins:
    """The pins of the export at ``root``, after checking that its files are exactly those pinned (and, given the
    registry's ``artifacts``, that they were pinned from those); FailedPrecondition otherwise."""
    try:
        stored = json.loads((root / PINS_FILE).read_text())
        pins = ExportPins(dict(stored["artifacts"]), dict(stored["files"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(
            f"the staged export has no valid pins ({type(exc).__name__}): fetch it again"
        ) from None
    if artifacts is not None and dict(artifacts) != pins.artifacts:
        raise FailedPrecondition("the staged export was fetched for other artifacts than the registry pins now")
    actual = export_files(root)
    if actual != pins.files:
        changed = sorted(set(actual.items()) ^ set(pins.files.items()))
        raise FailedPrecondition(f"the staged export's {changed[0][0]!r} differs from what was fetched and pinned")
    return pins
