"""The manifest an inference run writes into its output folder, and the removal of a previous run's outputs.

``output_dir/manifest.json`` lists what one run read and wrote: its inputs, its outputs (paths relative to
``output_dir``), its settings, the model file (path, size, SHA-256), the command, and when it started and ended.
It is rewritten (atomically) after every scan, so an interrupted run leaves a manifest that lists exactly the
outputs it wrote, with ``"status": "running"``.

Stale-output policy: a run into a folder that holds a previous run's manifest first removes the files that manifest
lists, and the sub-folders this leaves empty, and nothing else; so the folder never mixes the outputs of two runs.
Files that no manifest lists (the user's own, or outputs of a version without manifests) are never touched; the run
names them in a warning and in the manifest's ``other_files``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from bundle.config.paths import load_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "bundle inference manifest 1"
STAGING_PREFIX = ".partial-"


class ManifestError(ValueError):
    """An existing manifest that cannot be used; the message names the file."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def file_record(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """``{"path", "bytes", "sha256"}`` of a file (the model), or ``None`` for no file."""
    if path is None or not os.path.isfile(path):
        return None if path is None else {"path": os.path.abspath(path)}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def read_manifest(output_dir: str) -> Optional[Dict[str, Any]]:
    """The manifest of the previous run in ``output_dir``, or ``None`` when there is none.

    Raises:
        ManifestError: the file is not valid JSON, or not a manifest of this format (then nothing is removed).
    """
    path = os.path.join(output_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    manifest = load_json(path, ManifestError)
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    if (
        manifest.get("format") != FORMAT
        or not isinstance(outputs, list)
        or not all(isinstance(o, str) for o in outputs)
    ):
        raise ManifestError(
            f"{path}: not a manifest written by this bundle's inference ('format': '{FORMAT}' and a list of "
            "'outputs' expected); move it away or choose another output_dir."
        )
    return manifest


def _inside(output_dir: str, relative: str) -> Optional[str]:
    """``output_dir/relative`` when ``relative`` names a place strictly inside ``output_dir`` (no absolute path, no
    ``..``), else ``None``."""
    if os.path.isabs(relative) or not relative:
        return None
    path = os.path.normpath(os.path.join(output_dir, relative))
    return path if os.path.relpath(path, output_dir).split(os.sep)[0] not in ("..", ".") else None


def remove_previous_outputs(output_dir: str, protected: Sequence[str] = ()) -> List[str]:
    """Remove the files listed in ``output_dir``'s manifest (regular files inside ``output_dir`` only; never one of
    ``protected``, e.g. the run's inputs), the sub-folders left empty by that, and the manifest. Returns the removed
    files."""
    manifest = read_manifest(output_dir)
    if manifest is None:
        return []
    keep = {os.path.realpath(p) for p in protected}
    removed = []
    for relative in manifest["outputs"]:
        path = _inside(output_dir, relative)
        if path is None or not os.path.isfile(path) or os.path.islink(path) or os.path.realpath(path) in keep:
            continue
        os.remove(path)
        removed.append(path)
        folder = os.path.dirname(path)
        while os.path.realpath(folder) != os.path.realpath(output_dir) and not os.listdir(folder):
            os.rmdir(folder)
            folder = os.path.dirname(folder)
    os.remove(os.path.join(output_dir, MANIFEST_NAME))
    if removed:
        logger.info(f"removed the {len(removed)} output(s) of the previous run listed in its manifest")
    return removed


def other_files(output_dir: str, own: Sequence[str]) -> List[str]:
    """Files under ``output_dir`` (relative paths, sorted) that are neither in ``own`` nor the manifest nor staging."""
    own_set = set(own) | {MANIFEST_NAME}
    found = []
    for root, folders, files in os.walk(output_dir):
        folders[:] = [f for f in folders if not f.startswith(STAGING_PREFIX)]
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), output_dir)
            if relative not in own_set and not name.startswith(STAGING_PREFIX):
                found.append(relative)
    return sorted(found)


class RunManifest:
    """The manifest of the current run, written to ``output_dir/manifest.json`` by :meth:`write`.

    Args:
        output_dir: the run's output folder (exists).
        inputs: the input files, in order.
        settings: the run's settings (JSON-serialisable values; others are written as their ``str``).
        model: the weights file, or ``None``.
    """

    def __init__(self, output_dir: str, inputs: Sequence[str], settings: Dict[str, Any], model: Optional[str]):
        self.output_dir = output_dir
        self.content: Dict[str, Any] = {
            "format": FORMAT,
            "status": "running",
            "started": _now(),
            "finished": None,
            "command": list(sys.argv),
            "model": file_record(model),
            "settings": settings,
            "inputs": [os.path.abspath(p) for p in inputs],
            "outputs": [],
            "failed": [],
            "other_files": [],
        }

    def add_outputs(self, paths: Sequence[str]) -> None:
        """Record written files (absolute or relative to the working folder) and rewrite the manifest."""
        self.content["outputs"] += [os.path.relpath(p, self.output_dir) for p in paths]
        self.write()

    def add_failure(self, path: str, reason: str) -> None:
        self.content["failed"].append({"input": os.path.abspath(path), "reason": reason})
        self.write()

    def finish(self) -> List[str]:
        """Mark the run complete (or ``failed`` when an input failed), list the files in ``output_dir`` this run did
        not write (``other_files``, also logged as a warning), write, and return those files."""
        others = other_files(self.output_dir, self.content["outputs"])
        if others:
            logger.warning(
                f"{self.output_dir} also holds {len(others)} file(s) that this run did not write (listed in "
                f"{MANIFEST_NAME} as other_files): {', '.join(others[:10])}{', ...' if len(others) > 10 else ''}"
            )
        self.content.update(
            status="failed" if self.content["failed"] else "complete", finished=_now(), other_files=others
        )
        self.write()
        return others

    def write(self) -> str:
        """Write the manifest under a temporary name, then rename it."""
        path = os.path.join(self.output_dir, MANIFEST_NAME)
        temporary = os.path.join(self.output_dir, f"{STAGING_PREFIX}{MANIFEST_NAME}-{os.getpid()}")
        with open(temporary, "w") as handle:
            json.dump(self.content, handle, indent=4, default=str)
        os.replace(temporary, path)
        return path
