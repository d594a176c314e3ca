"""An interrupted benchmark training continues from its latest checkpoint when its command is run again.

Why: a session's end or a kill stops long CPU runs; the bundle's resume is bit-identical to an uninterrupted run
(``tests/engine/test_resume.py``), so rerunning the same ``scripts/benchmark.py accuracy`` command loses at most one
checkpoint interval instead of the whole run, and a run longer than a session can be finished in parts.

Each training part is appended to ``<run_dir>/train_parts.json`` when it starts: the bundle command it runs (without
its ``resume_from``), the commit, the iteration it starts from and its start time. A rerun resumes from the newest
``checkpoints/checkpoint_iteration=N.pt`` only when the run folder's last part ran the same command; the interrupted
part is then timed up to that checkpoint's modification time (the work after it is done again and not counted), so
``train_seconds`` is the sum of the parts' times over the iterations that count.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

from bundle.config.errors import BundleError

PARTS_FILE = "train_parts.json"
CHECKPOINT_DIR = "checkpoints"
_INTERVAL_CHECKPOINT = re.compile(r"checkpoint_iteration=(\d+)\.pt$")


def latest_checkpoint(checkpoint_dir: str) -> Optional[Tuple[int, str]]:
    """``(N, path)`` of the newest ``checkpoint_iteration=N.pt`` in ``checkpoint_dir`` (largest ``N``), or ``None``.
    Files being written (``.tmp``, removed when training restarts) do not match."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "checkpoint_iteration=*.pt")):
        match = _INTERVAL_CHECKPOINT.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def read_parts(run_dir: str) -> List[Dict[str, Any]]:
    """The training parts recorded in ``run_dir`` (``[]`` when there are none)."""
    path = os.path.join(run_dir, PARTS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return json.load(handle)


def _write_parts(run_dir: str, parts: List[Dict[str, Any]]) -> None:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, PARTS_FILE)
    with open(path + ".tmp", "w") as handle:
        json.dump(parts, handle, indent=4)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def _remove_checkpoints(checkpoint_dir: str) -> None:
    """Remove the checkpoints of an earlier training in ``checkpoint_dir``, so that a later resume cannot read them."""
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "checkpoint_*.pt")):
        os.remove(path)


def start_part(run_dir: str, command: List[str], commit: str, hardware: str, retrain: bool = False) -> Optional[str]:
    """Record a training part of ``command`` (at ``commit``, on ``hardware``) in ``run_dir`` and return the checkpoint
    it resumes from (``None``: from the first iteration, after removing any checkpoint of an earlier training).

    It resumes unless ``retrain`` or there is no interval checkpoint. Raises
    :class:`~bundle.config.errors.BundleError` (one line on the command line), naming the run folder and before any
    work, when the checkpoints come from another command or from a training whose parts were not recorded.
    """
    checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
    latest = None if retrain else latest_checkpoint(checkpoint_dir)
    parts = [] if latest is None else read_parts(run_dir)
    if latest is None:
        _remove_checkpoints(checkpoint_dir)
    else:
        iteration, path = latest
        if not parts:
            raise BundleError(
                f"{run_dir}: {path} is left by a training whose parts were not recorded in {PARTS_FILE}; its command "
                "is unknown, so it cannot be resumed safely: rerun with --retrain to start over."
            )
        last = parts[-1]
        if last["command"][1:] != command[1:]:  # the interpreter's path may differ between sessions
            raise BundleError(
                f"{run_dir}: its interrupted training ran another command ({' '.join(last['command'])}); rerun the "
                "same command to resume it, or --retrain to start over."
            )
        progressed = iteration > last["from_iteration"]
        last["to_iteration"] = iteration if progressed else last["from_iteration"]
        last["seconds"] = max(0.0, os.path.getmtime(path) - last["start"]) if progressed else 0.0
    resume_from = None if latest is None else latest[1]
    start_iteration = 0 if latest is None else latest[0]
    part = {"command": command, "commit": commit, "hardware": hardware, "from_iteration": start_iteration}
    parts.append({**part, "start": time.time()})
    _write_parts(run_dir, parts)
    return resume_from


def finish_part(run_dir: str, seconds: float, max_iterations: int) -> Dict[str, Any]:
    """Close the last part (``seconds`` of wall time, up to ``max_iterations``) and return the training's timing:
    ``train_seconds`` (the sum over parts), and for a resumed training ``resumed_at`` (the iterations it resumed
    from) and ``train_parts`` (per part: commit, hardware, iterations, seconds)."""
    parts = read_parts(run_dir)
    if not parts:
        raise ValueError(f"{run_dir}: no training part was started ({PARTS_FILE} missing).")
    parts[-1]["to_iteration"] = max_iterations
    parts[-1]["seconds"] = float(seconds)
    _write_parts(run_dir, parts)
    timing: Dict[str, Any] = {"train_seconds": sum(part["seconds"] for part in parts)}
    if len(parts) > 1:
        timing["resumed_at"] = [part["from_iteration"] for part in parts[1:]]
        timing["train_parts"] = [
            {key: part[key] for key in ("commit", "hardware", "from_iteration", "to_iteration", "seconds")}
            for part in parts
        ]
    return timing


def resumed_note(timing: Dict[str, Any]) -> str:
    """The sentence a record's notes get when its training was resumed ("" otherwise)."""
    if not timing.get("resumed_at"):
        return ""
    iterations = ", ".join(str(i) for i in timing["resumed_at"])
    machines = sorted({part["hardware"] for part in timing["train_parts"]})
    where = "" if len(machines) == 1 else f" The parts ran on different machines ({'; '.join(machines)})."
    return (
        f"Training was interrupted and resumed from its checkpoint at iteration {iterations} (the bundle's resume is "
        f"bit-identical to an uninterrupted run); train time sums the parts up to the checkpoints used.{where}"
    )
