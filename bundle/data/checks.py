"""Checks that run before training starts: writable output folders, the resume file, and every volume's voxels
(setting types: :func:`bundle.config.settings.check_settings`).

Each check collects *all* problems it finds and raises them at once with :func:`stop`, a
:class:`~bundle.config.errors.BundleError` (one line per file and problem). On the command line the report is the last
thing printed and the exit status is 1, instead of a traceback ending in MONAI's generic "Failed to instantiate
component" (:mod:`bundle.config.errors`); in-process callers catch the exception.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from monai.data import CacheDataset

from bundle.config.errors import BundleError
from bundle.data.datalists import DatasetError, build_datalists, item_files
from bundle.data.transforms import LoadVolumed, check_volume_transforms


def stop(title: str, lines: Sequence[str]) -> None:
    """Raise :class:`~bundle.config.errors.BundleError` with ``title`` and one indented line per problem; the command
    line turns it into that report as the last output and exit status 1 (:mod:`bundle.config.errors`)."""
    raise BundleError(title, lines)


def check_writable(folders: Sequence[str]) -> None:
    """Create each folder if needed and write (then remove) a probe file in it; stop naming every folder that is not
    writable, so that a bad ``output_dir`` / ``model_dir`` is found before training rather than after it."""
    problems = []
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as err:
            problems.append(f"{folder}: not writable ({err.strerror or err})")
    if problems:
        stop("Output folders are not writable; nothing was trained:", problems)


def check_resume_file(path: Optional[str]) -> None:
    """Before anything is built or read: the ``resume_from`` checkpoint exists and is a complete zip archive (the
    format of ``torch.save``; its index is at the end, so a truncated or empty file fails here). ``None`` passes.
    The full read, in :class:`bundle.engine.handlers.ResumeLoader`, checks the content."""
    if path is None:
        return
    if not os.path.isfile(path):
        stop("Cannot resume:", [f"{path}: checkpoint file not found"])
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as err:
        stop("Cannot resume:", [f"{path}: not a complete checkpoint, truncated or corrupt ({err})"])


def check_weights_file(path: str, title: str = "Cannot evaluate:") -> None:
    """The weights file a run loads (``configs/evaluate.json``: ``ckpt_path``) exists and is a complete zip archive;
    else stop with ``title`` and one line naming it."""
    if not os.path.isfile(path):
        stop(title, [f"{path}: no trained weights (train first, or set ckpt_path)."])
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as err:
        stop(title, [f"{path}: not a complete weights file, truncated or corrupt ({err})."])


def batch_label_problems(label: Any, num_classes: int, files: Optional[Sequence[str]] = None) -> List[str]:
    """One line per item of a labeled batch ``(B, 1, *S)`` whose label values lie outside ``[0, num_classes)``,
    naming the item's label file (``files``, else the batch's metadata) and the values."""
    values = torch.as_tensor(label)
    outside = (values < 0) | (values >= num_classes)
    if not bool(outside.any()):
        return []
    files = files if files is not None else getattr(label, "meta", {}).get("filename_or_obj", [])
    files = [files] if isinstance(files, str) else list(files)
    lines = []
    for index in range(values.shape[0]):
        bad = torch.unique(values[index][outside[index]])
        if bad.numel():
            name = files[index] if index < len(files) else f"item {index} of the batch"
            lines.append(
                f"{name}: label values {[float(v) for v in bad[:10]]} outside [0, {num_classes}) "
                f"(out_channels={num_classes}) in a training patch"
            )
    return lines


def check_batch_labels(label: Any, num_classes: int, files: Optional[Sequence[str]] = None) -> None:
    """Stop naming each label file of a training batch with values outside ``[0, num_classes)``
    (:func:`batch_label_problems`), where the loss would fail; the trainer checks every labeled batch."""
    lines = batch_label_problems(label, num_classes, files)
    if lines:
        stop(
            "Data check failed: labels outside the classes; nothing more was trained. Fix these files (check_data "
            "true, the default, finds every such file before training):",
            lines,
        )


def datalists_or_exit(**kwargs: Any) -> Dict[str, List[Dict[str, str]]]:
    """:func:`bundle.data.datalists.build_datalists`, stopping with its report (every header problem) instead of a
    traceback."""
    try:
        return build_datalists(**kwargs)
    except DatasetError as err:
        stop("Data check failed:", str(err).splitlines())


def problem_lines(item: Dict[str, str], err: BaseException) -> List[str]:
    """The report lines of an item whose loading or checking raised ``err``: the lines of the innermost
    :class:`DatasetError` in the cause chain (they name the file), else the innermost cause prefixed by the item's
    files (MONAI wraps transform errors in ``RuntimeError("applying transform ...")``)."""
    cause: Optional[BaseException] = err
    innermost = err
    while cause is not None:
        if isinstance(cause, DatasetError):
            return str(cause).splitlines()
        innermost, cause = cause, cause.__cause__
    files = " / ".join(item_files(item))
    return [f"{files}: {type(innermost).__name__}: {' '.join(str(innermost).split())}"]


class CheckedCacheDataset(CacheDataset):
    """``CacheDataset`` whose up-front pass doubles as the data check: every item is read once, checked by the
    transform chain (:class:`bundle.data.transforms.CheckVolumed`), and the result cached, so nothing is read twice.

    MONAI's ``CacheDataset`` stops at the first failing item with a traceback naming no file; here each failure is
    recorded in :attr:`problems` (``(index, lines)``) and the item is cached as ``None``, so that
    :func:`report_data_problems` can list every problem of every dataset at once. Items beyond ``cache_rate`` are
    read once up front to check them too (and again when drawn). With ``check=False`` it is a plain
    ``CacheDataset``.

    Args:
        data, transform, cache_rate, kwargs: as ``monai.data.CacheDataset``.
        check: record problems instead of raising, and read the uncached items once.
    """

    def __init__(self, data: Sequence, transform: Any, cache_rate: float = 1.0, check: bool = True, **kwargs) -> None:
        self.check = check
        self.problems: List[Tuple[int, List[str]]] = []
        super().__init__(data, transform, cache_rate=cache_rate, **kwargs)
        if check:
            for index in range(self.cache_num, len(self.data)):
                self._load_cache_item(index)

    def _load_cache_item(self, idx: int):
        if not self.check:
            return super()._load_cache_item(idx)
        try:
            return super()._load_cache_item(idx)
        except Exception as err:  # every kind of unreadable or invalid item is reported, not raised
            self.problems.append((idx, problem_lines(self.data[idx], err)))
            return None


def report_data_problems(datasets: Sequence[Optional[CheckedCacheDataset]]) -> None:
    """Stop with every problem recorded by the given datasets (in dataset and item order), if there are any."""
    lines: List[str] = []
    for dataset in datasets:
        for _, item_lines in sorted(getattr(dataset, "problems", []), key=lambda p: p[0]):
            lines += [line for line in item_lines if line not in lines]
    if lines:
        stop(
            f"Data check failed: {len(lines)} problem(s); nothing was trained. Fix or remove these files "
            "(check_data false skips the voxel checks):",
            lines,
        )


def check_dataset(
    dataset_dir: str,
    out_channels: int = 2,
    in_channels: int = 1,
    train_list: Optional[str] = None,
    val_list: Optional[str] = None,
) -> int:
    """Check a whole dataset as training would, without training: every header
    (:func:`bundle.data.datalists.check_items`), then every volume's voxels (readable to the end, finite, labels in
    ``[0, out_channels)``, label affine equal to the image's). Labels of every labeled item are checked
    (``num_labeled`` = all). Returns the number of items checked; stops with the report when anything is wrong."""
    lists = datalists_or_exit(
        dataset_dir=dataset_dir,
        num_labeled=-1,
        train_list=train_list,
        val_list=val_list,
        require_unlabeled=False,
        in_channels=in_channels,
    )
    items = lists["labeled"] + lists["unlabeled"] + lists["validation"]
    problems: List[str] = []
    for item in items:
        keys = [k for k in ("image", "label") if k in item]
        chain = [LoadVolumed(keys)] + check_volume_transforms(keys, num_classes=out_channels)
        try:
            data = dict(item)
            for transform in chain:
                data = transform(data)
        except Exception as err:  # reported per item, as in training
            problems += [line for line in problem_lines(item, err) if line not in problems]
    if problems:
        stop(f"Data check failed: {len(problems)} problem(s) in {dataset_dir}:", problems)
    return len(items)
