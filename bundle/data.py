"""Readers and datalists: LA h5 cases and NIfTI data become one list of dicts.

Labeled items are ``{"image": path, "label": path}``; unlabeled items are ``{"image": path}`` and never carry a
label, so no method can read one. Every check runs before training starts and names the file and the problem.

Supported layouts of ``dataset_dir``:

* **LA h5** (the benchmark release): ``<dataset_dir>/<case>/mri_norm2.h5`` plus a list file naming the cases. The
  first ``num_labeled`` cases of the list are labeled, the rest unlabeled (the papers' protocol).
* **MSD-style** ``<dataset_dir>/dataset.json`` with a ``training`` list (items without ``label`` are unlabeled),
  optional ``validation`` list and optional ``unlabeled``/``test`` lists (paths or ``{"image": ...}``).
* **Folders** ``<dataset_dir>/imagesTr`` + ``<dataset_dir>/labelsTr`` (same file names); images without a label
  file are unlabeled (a label file without an image is an error); an optional ``imagesUnlabeled`` folder adds more
  unlabeled images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from bundle.errors import BundleError

LA_FILE_NAME = "mri_norm2.h5"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DatasetError(BundleError):
    """A problem with the user's data, found before training or inference starts (one line per file)."""


class H5Reader(ImageReader):
    """MONAI ``ImageReader`` for the LA benchmark's h5 files (one dataset per array, no affine, no spacing).

    MONAI has no h5 reader. The array is read as stored (W, H, D); the affine is the identity, as the files carry
    none. Used through ``LoadImaged(keys="image", reader=H5Reader(dataset="image"))``; non-h5 files fall through
    to MONAI's default readers.

    Args:
        dataset: name of the h5 dataset to read (``"image"`` or ``"label"``).
    """

    def __init__(self, dataset: str = "image") -> None:
        super().__init__()
        self.dataset = dataset

    def verify_suffix(self, filename) -> bool:
        return all(str(f).endswith(".h5") for f in ensure_tuple(filename))

    def read(self, data, **kwargs) -> List[np.ndarray]:
        import h5py

        arrays = []
        for name in ensure_tuple(data):
            with h5py.File(name, "r") as handle:
                if self.dataset not in handle:
                    raise DatasetError(f"{name}: h5 file has no dataset '{self.dataset}' (has {sorted(handle)}).")
                arrays.append(np.asarray(handle[self.dataset][()]))
        return arrays

    def get_data(self, img) -> tuple:
        meta: dict = {}
        for array in img:
            header = {
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.AFFINE: np.eye(4),
                MetaKeys.ORIGINAL_AFFINE: np.eye(4),
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            }
            _copy_compatible_dict(header, meta)
        return _stack_images([a.astype(np.float32) for a in img], meta), meta


# --------------------------------------------------------------------------------------------- file inspection
def volume_shape(path: str, dataset: str = "image") -> tuple:
    """Shape of a volume from its header only (no voxel data is read). Raises :class:`DatasetError`."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found.")
    if path.endswith(".h5"):
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                if dataset not in handle:
                    raise DatasetError(f"{path}: h5 file has no dataset '{dataset}' (has {sorted(handle)}).")
                return tuple(handle[dataset].shape)
        except OSError as err:
            raise DatasetError(f"{path}: not a readable h5 file ({err}).") from err
    try:
        return tuple(nib.load(path).shape)
    except Exception as err:  # nibabel raises several exception types for bad files
        raise DatasetError(f"{path}: not a readable image ({err}).") from err


def check_items(items: Sequence[Dict[str, str]], in_channels: int = 1) -> None:
    """Check that every file exists and is readable, is 3D (or 4D with ``in_channels`` channels), and that image
    and label shapes match. Reads headers only. Raises one :class:`DatasetError` listing every bad file, one line
    per file and problem."""
    problems: List[str] = []
    for item in items:
        try:
            _check_item(item, in_channels)
        except DatasetError as err:
            problems += [line for line in str(err).splitlines() if line not in problems]
    if problems:
        raise DatasetError("\n".join(problems))


def _check_item(item: Dict[str, str], in_channels: int) -> None:
    shape = volume_shape(item["image"], "image")
    spatial = _spatial_shape(item["image"], shape, in_channels)
    if "label" in item:
        label_shape = volume_shape(item["label"], "label")
        if tuple(label_shape[:3]) != spatial or any(s != 1 for s in label_shape[3:]):
            raise DatasetError(
                f"{item['label']}: label shape {label_shape} does not match image shape {shape} of {item['image']}."
            )


def _spatial_shape(path: str, shape: tuple, in_channels: int) -> tuple:
    if len(shape) == 3 and in_channels == 1:
        return tuple(shape)
    if len(shape) == 4 and shape[3] == in_channels:
        return tuple(shape[:3])
    raise DatasetError(f"{path}: image shape {shape} is not 3D with {in_channels} channel(s).")


# ------------------------------------------------------------------------------------------------ datalists
def read_case_list(list_file: str) -> List[str]:
    """Case ids of a list file, one a line, blank lines ignored."""
    if not os.path.isfile(list_file):
        raise DatasetError(f"{list_file}: list file not found.")
    with open(list_file) as handle:
        return [line.strip() for line in handle if line.strip()]


def la_items(dataset_dir: str, case_ids: Sequence[str]) -> List[Dict[str, str]]:
    """Labeled items for LA case folders ``<dataset_dir>/<case>/mri_norm2.h5`` (image and label in one file)."""
    items = []
    for case in case_ids:
        path = os.path.join(dataset_dir, case, LA_FILE_NAME)
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: case '{case}' named in the list has no {LA_FILE_NAME}.")
        items.append({"image": path, "label": path})
    return items


def _resolve(dataset_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(dataset_dir, path))


def _resolve_list(dataset_dir: str, list_file: str) -> str:
    """A list file relative to ``dataset_dir`` (``train.list``), else as given (absolute, or relative to the working
    folder, e.g. a benchmark's ``runs/benchmark/<run>/train.list``)."""
    in_dataset = _resolve(dataset_dir, list_file)
    return in_dataset if os.path.isfile(in_dataset) or not os.path.isfile(list_file) else list_file


def _msd_items(dataset_dir: str, entries: Sequence[Any]) -> List[Dict[str, str]]:
    items = []
    for entry in entries:
        entry = {"image": entry} if isinstance(entry, str) else entry
        item = {"image": _resolve(dataset_dir, entry["image"])}
        if entry.get("label"):
            item["label"] = _resolve(dataset_dir, entry["label"])
        items.append(item)
    return items


def _nifti_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES)) if folder.is_dir() else []


def _folder_items(dataset_dir: str) -> List[Dict[str, str]]:
    """Items of the ``imagesTr/`` + ``labelsTr/`` layout; a label whose image is missing (e.g. a misspelt name)
    raises :class:`DatasetError` naming every such label, instead of being silently ignored."""
    root = Path(dataset_dir)
    images = {p.name for p in _nifti_files(root / "imagesTr")}
    orphans = [p for p in _nifti_files(root / "labelsTr") if p.name not in images]
    if orphans:
        raise DatasetError(
            "\n".join(f"{label}: label has no image of the same name in {root / 'imagesTr'}." for label in orphans)
        )
    items = []
    for image in _nifti_files(root / "imagesTr"):
        label = root / "labelsTr" / image.name
        items.append({"image": str(image), "label": str(label)} if label.is_file() else {"image": str(image)})
    items += [{"image": str(p)} for p in _nifti_files(root / "imagesUnlabeled")]
    return items


def build_datalists(
    dataset_dir: str,
    num_labeled: int = -1,
    train_list: Optional[str] = None,
    val_list: Optional[str] = None,
    require_unlabeled: bool = True,
    in_channels: int = 1,
) -> Dict[str, List[Dict[str, str]]]:
    """Split a dataset into ``labeled``, ``unlabeled`` and ``validation`` item lists, checking every file.

    Args:
        dataset_dir: the dataset root (one of the layouts in the module docstring).
        num_labeled: how many labeled items to keep as labeled (the first ones, in list order); the remaining
            labeled items become unlabeled (their labels are dropped). -1 keeps all labels.
        train_list: LA layout only: the list file of training cases (default ``<dataset_dir>/train.list``); a
            relative path is looked up in ``dataset_dir`` first, then in the working folder.
        val_list: LA layout only: an optional list file of validation cases (labeled, never trained on), looked up
            like ``train_list``.
        require_unlabeled: raise when no unlabeled item remains (every SSL method needs some).
        in_channels: expected number of image channels.

    Returns:
        ``{"labeled": [...], "unlabeled": [...], "validation": [...]}``; validation may be empty.
    """
    if not dataset_dir or not os.path.isdir(dataset_dir):
        raise DatasetError(f"{dataset_dir}: dataset_dir does not exist or is not a folder.")
    validation: List[Dict[str, str]] = []
    msd_file = os.path.join(dataset_dir, "dataset.json")
    if os.path.isfile(msd_file):
        with open(msd_file) as handle:
            spec = json.load(handle)
        items = _msd_items(dataset_dir, spec.get("training", []))
        items += _msd_items(dataset_dir, spec.get("unlabeled", []) + spec.get("test", []))
        validation = _msd_items(dataset_dir, spec.get("validation", []))
    elif train_list or os.path.isfile(os.path.join(dataset_dir, "train.list")):
        list_path = _resolve_list(dataset_dir, train_list or "train.list")
        items = la_items(dataset_dir, read_case_list(list_path))
        if val_list:
            validation = la_items(dataset_dir, read_case_list(_resolve_list(dataset_dir, val_list)))
    elif (Path(dataset_dir) / "imagesTr").is_dir():
        items = _folder_items(dataset_dir)
    else:
        raise DatasetError(
            f"{dataset_dir}: no dataset found (expected dataset.json, train.list with <case>/{LA_FILE_NAME} "
            "folders, or imagesTr/ + labelsTr/)."
        )
    labeled = [item for item in items if "label" in item]
    unlabeled = [item for item in items if "label" not in item]
    if num_labeled is not None and num_labeled >= 0:
        if num_labeled > len(labeled):
            raise DatasetError(f"{dataset_dir}: num_labeled={num_labeled} but only {len(labeled)} labeled items.")
        unlabeled = [{"image": item["image"]} for item in labeled[num_labeled:]] + unlabeled
        labeled = labeled[:num_labeled]
    if not labeled:
        raise DatasetError(f"{dataset_dir}: no labeled items (num_labeled={num_labeled}).")
    if require_unlabeled and not unlabeled:
        raise DatasetError(
            f"{dataset_dir}: no unlabeled items for a semi-supervised method; lower num_labeled, add unlabeled "
            "images, or use the supervised preset."
        )
    check_items(labeled + unlabeled + validation, in_channels)
    return {"labeled": labeled, "unlabeled": unlabeled, "validation": validation}
