"""Paths a user gives: listed literally, never confused with the outputs, and JSON files read with a named error.

* :func:`list_files` lists a folder literally (a name with ``[`` ``]`` or ``*`` works) and expands a glob only when
  the user gave a pattern, i.e. a path that is not an existing folder.
* :func:`check_outputs_apart` refuses an output folder that is, under any spelling (relative, ``..``, a symlink), a
  folder holding the inputs, or one whose outputs the input pattern would pick up on the next run; inference,
  ranking and evaluation call it before reading anything.
* :func:`load_json` reads a JSON file and names it, with the line and column of a syntax error.
* :class:`CreatedFolderGuard` removes the folders a training run created when it fails before its first iteration.
"""

from __future__ import annotations

import atexit
import fnmatch
import glob
import json
import os
import shutil
import time
from typing import Any, Iterable, List, Optional, Sequence


class PathError(ValueError):
    """A path the user gave cannot be used as asked; the message names the path(s), one line per problem."""


# --------------------------------------------------------------------------------------------------- listing
def list_files(folder_or_pattern: str, suffixes: Sequence[str]) -> List[str]:
    """Files whose names end with one of ``suffixes``, sorted: directly inside ``folder_or_pattern`` when it is an
    existing folder (listed literally: ``scans [v2]`` is a folder name, not a pattern), else matching it as a glob
    pattern. In a pattern, a leading part that is an existing folder is taken literally too
    (``scans [v2]/*_0000.nii.gz``)."""
    if os.path.isdir(folder_or_pattern):
        with os.scandir(folder_or_pattern) as entries:
            paths = [os.path.join(folder_or_pattern, e.name) for e in entries]
    else:
        head, tail = os.path.split(folder_or_pattern)
        pattern = os.path.join(glob.escape(head), tail) if head and os.path.isdir(head) else folder_or_pattern
        paths = glob.glob(pattern)
    return sorted(p for p in paths if p.endswith(tuple(suffixes)) and os.path.isfile(p))


def is_pattern(folder_or_pattern: str) -> bool:
    """Whether :func:`list_files` treats ``folder_or_pattern`` as a glob pattern (it is not an existing folder)."""
    return not os.path.isdir(folder_or_pattern)


# ----------------------------------------------------------------------------------------------- input safety
def _folders_of(paths: Iterable[str]) -> dict:
    """``{resolved folder: the folder as given}`` of each path's folder, and of the folder of its symlink target."""
    folders = {}
    for path in paths:
        given = os.path.dirname(os.path.abspath(path))
        folders.setdefault(os.path.realpath(given), given)
        folders.setdefault(os.path.dirname(os.path.realpath(path)), given)
    return folders


def _matches(pattern: str, path: str) -> bool:
    """Glob semantics on whole path components (``*`` never crosses a ``/``)."""
    pattern_parts, path_parts = pattern.split(os.sep), path.split(os.sep)
    return len(pattern_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(part, rule) for part, rule in zip(path_parts, pattern_parts)
    )


def check_outputs_apart(
    inputs: Sequence[str],
    output_dir: str,
    subfolders: Sequence[str] = (),
    input_pattern: Optional[str] = None,
    output_names: Sequence[str] = (),
    input_folders: Sequence[str] = (),
) -> None:
    """Refuse to write into, or delete from, a folder that holds inputs.

    The folders the run writes into are ``output_dir``, its ``subfolders`` and its hidden staging folders
    (``.partial-*``, removed on the next run). Each is resolved (``os.path.realpath``: relative paths, ``..`` and
    symlinks) and compared with the folder of every input, as given and as its symlink target resolves. With an
    ``input_pattern`` (a glob the inputs came from), the files the run would write (``output_names`` in each
    written folder) must not match it either, or they would become inputs of the next run.

    Args:
        inputs: every input file (scans, labels, list files).
        output_dir: the run's output folder (need not exist).
        subfolders: its sub-folders the run writes into (``probabilities``, ``figures``, ...); an absolute path is
            another folder the run writes into.
        input_pattern: the glob the inputs were listed with, if any.
        output_names: the file names the run writes (``case.nii.gz``, ...), for the pattern test.
        input_folders: folders that count as input folders besides those of ``inputs`` (the ``dataset_dir``).

    Raises:
        PathError: one line naming the output folder and the input folder or pattern.
    """
    given_folders = input_folders
    input_folders = _folders_of(inputs)
    for folder in given_folders:
        input_folders.setdefault(os.path.realpath(folder), folder)
    output_real = os.path.realpath(output_dir)
    written = [output_dir] + [os.path.join(output_dir, sub) for sub in subfolders]
    for folder in written:
        real = os.path.realpath(folder)
        if real in input_folders:
            raise PathError(
                f"{folder}: this output folder is the folder holding the inputs, {input_folders[real]} (both are "
                f"{real}); writing there would overwrite or mix with the inputs. Choose an output_dir outside the "
                "input folders; nothing was read or written."
            )
    for real, given in input_folders.items():
        relative = os.path.relpath(real, output_real)
        if not relative.startswith("..") and relative.split(os.sep)[0].startswith(".partial-"):
            raise PathError(
                f"{output_dir}: the inputs in {given} lie in a staging folder of this output folder, which the run "
                "removes. Move the inputs; nothing was read or written."
            )
    if input_pattern:
        pattern = os.path.abspath(input_pattern)
        for folder in written:
            for name in output_names:
                candidates = {os.path.abspath(os.path.join(folder, name)), os.path.join(os.path.realpath(folder), name)}
                for candidate in candidates:
                    if _matches(pattern, candidate):
                        raise PathError(
                            f"{folder}: the outputs written here ({name}, ...) match the input pattern "
                            f"{input_pattern} and would be read as inputs by the next run. Choose an output_dir "
                            "that the pattern does not match; nothing was read or written."
                        )


def outputs_apart_or_exit(title: str, **kwargs: Any) -> None:
    """:func:`check_outputs_apart` for a config (``configs/evaluate.json``): stops with ``title`` and its line."""
    from bundle.data.checks import stop

    try:
        check_outputs_apart(**kwargs)
    except PathError as err:
        stop(title, str(err).splitlines())


# ------------------------------------------------------------------------------------------------------ json
def load_json(path: str, error: type = PathError) -> Any:
    """The content of the JSON file ``path``; raises ``error`` with one line naming the file and the problem (not
    found, unreadable, or the JSON syntax error with its line and column)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.") from err
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a text file ({err.reason} at byte {err.start}).") from err
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err}).") from err


# ------------------------------------------------------------------------------------------- training folders
#: guards whose run has not completed an iteration yet; removed from here by :func:`keep_created_folders`.
_PENDING_GUARDS: List["CreatedFolderGuard"] = []


class CreatedFolderGuard:
    """Removes the folders a training run created if the process ends before the run completes an iteration.

    Made before ``output_dir`` / ``model_dir`` are created (``configs/train.json``: before the writable check). It
    records which of ``folders`` (and their parents) do not exist yet, and, for those that do, which sub-folders they
    hold; at process exit (``atexit``: also on ``SystemExit`` and uncaught errors), unless
    :func:`keep_created_folders` ran first (the trainer's first completed iteration), it removes every folder that
    appeared since, with its content: a run that fails on its data, settings or first iteration leaves no empty
    ``models/`` or ``runs/train/tensorboard/`` behind. A folder holding a file older than the guard is kept.

    Args:
        folders: the run's output folders.
    """

    def __init__(self, folders: Sequence[str]) -> None:
        self.start = time.time()
        self.created: List[str] = []
        self.snapshots = {}
        for folder in dict.fromkeys(os.path.abspath(f) for f in folders):
            if os.path.isdir(folder):
                self.snapshots[folder] = {root for root, _, _ in os.walk(folder)}
                continue
            top = folder
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            self.created.append(top)
        _PENDING_GUARDS.append(self)
        atexit.register(self.remove_new_folders)

    def new_folders(self) -> List[str]:
        """The top-most folders that appeared under the guarded folders since the guard was made."""
        found = [f for f in self.created if os.path.isdir(f)]
        for folder, before in self.snapshots.items():
            for root, subfolders, _ in os.walk(folder):
                new = [s for s in subfolders if os.path.join(root, s) not in before]
                found += [os.path.join(root, s) for s in new]
                subfolders[:] = [s for s in subfolders if s not in new]
        return found

    def remove_new_folders(self) -> List[str]:
        """Remove :meth:`new_folders` unless the run completed an iteration; returns the removed folders."""
        if self not in _PENDING_GUARDS:
            return []
        _PENDING_GUARDS.remove(self)
        removed = []
        for folder in self.new_folders():
            files = [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names]
            if all(os.path.getmtime(f) >= self.start - 1.0 for f in files if os.path.isfile(f)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed


def keep_created_folders(*_: Any) -> None:
    """The run completed an iteration: keep every folder it created (see :class:`CreatedFolderGuard`)."""
    for guard in list(_PENDING_GUARDS):
        _PENDING_GUARDS.remove(guard)
        atexit.unregister(guard.remove_new_folders)


def keep_folders_after_first_iteration(engine: Any) -> None:
    """Call :func:`keep_created_folders` when ``engine`` (the trainer) completes its first iteration (also the
    first iteration of a resumed run)."""
    from ignite.engine import Events

    def first_iteration(engine: Any) -> None:
        keep_created_folders()
        engine.remove_event_handler(first_iteration, Events.ITERATION_COMPLETED)

    engine.add_event_handler(Events.ITERATION_COMPLETED, first_iteration)
