"""Readers and datalists: LA h5 cases and NIfTI data become one list of dicts.

Labeled items are ``{"image": path, "label": path}`` (``image`` a list of paths, one per channel, for nnU-Net
data); unlabeled items are ``{"image": path}`` and never carry a
label, so no method can read one. Every check runs before training starts and names the file and the problem.

Supported layouts of ``dataset_dir``:

* **LA h5** (the benchmark release): ``<dataset_dir>/<case>/mri_norm2.h5`` plus a list file naming the cases. The
  first ``num_labeled`` cases of the list are labeled, the rest unlabeled (the papers' protocol).
* **nnU-Net v2 raw** ``<dataset_dir>/dataset.json`` with ``channel_names``, ``labels`` (name -> value),
  ``numTraining`` and ``file_ending``; ``imagesTr/<CASE>_<XXXX><file_ending>`` (one file per channel, stacked in
  channel order), ``labelsTr/<CASE><file_ending>``, and ``imagesTs/`` (no labels: unlabeled training data). Items
  carry their ``case`` identifier, the name of every output.
* **MSD-style** ``<dataset_dir>/dataset.json`` with a ``training`` list (items without ``label`` are unlabeled),
  optional ``validation`` list and optional ``unlabeled``/``test`` lists (paths or ``{"image": ...}``).
* **Folders** ``<dataset_dir>/imagesTr`` + ``<dataset_dir>/labelsTr`` (same file names); images without a label
  file are unlabeled (a label file without an image is an error); an optional ``imagesUnlabeled`` folder adds more
  unlabeled images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.transforms import LoadImage
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from bundle.config.errors import BundleError
from bundle.config.paths import load_json
from bundle.data.image_formats import NIFTI_SUFFIXES, case_name, image_format

LA_FILE_NAME = "mri_norm2.h5"
#: an nnU-Net image file name without its ending: ``<CASE>_<XXXX>``, XXXX the 4-digit channel index.
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: channel and class counts of a dataset that does not state them (the synthetic and LA data).
DEFAULT_CHANNELS = {"in_channels": 1, "out_channels": 2}


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
    """Shape of a volume, from its header where the format has one (NIfTI, h5, NRRD with pynrrd); a DICOM series
    (a folder) is read through MONAI's readers. Raises :class:`DatasetError`."""
    kind = image_format(path)
    if not (os.path.isdir(path) if kind == "DICOM" else os.path.isfile(path)):
        raise DatasetError(f"{path}: file not found.")
    if kind == "h5":
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                if dataset not in handle:
                    raise DatasetError(f"{path}: h5 file has no dataset '{dataset}' (has {sorted(handle)}).")
                return tuple(handle[dataset].shape)
        except OSError as err:
            raise DatasetError(f"{path}: not a readable h5 file ({err}).") from err
    try:
        if kind == "NIfTI":
            return tuple(nib.load(path).shape)
        if kind == "NRRD" and importlib.util.find_spec("nrrd") is not None:
            import nrrd

            return tuple(int(size) for size in nrrd.read_header(path)["sizes"])
        return tuple(LoadImage(image_only=True)(path).shape)
    except Exception as err:  # each reader raises its own exception types for bad files
        raise DatasetError(f"{path}: not a readable image ({kind}: {' '.join(str(err).split())[:300]}).") from err


def check_items(items: Sequence[Dict[str, Any]], in_channels: int = 1) -> None:
    """Check that every file exists and is readable, is 3D (or 4D with ``in_channels`` channels, or one 3D file per
    channel, all of one shape), and that image and label shapes match. Reads headers only (a DICOM series in full:
    :func:`volume_shape`). Raises one :class:`DatasetError` listing every bad file, one line per file and problem."""
    problems: List[str] = []
    for item in items:
        try:
            _check_item(item, in_channels)
        except DatasetError as err:
            problems += [line for line in str(err).splitlines() if line not in problems]
    if problems:
        raise DatasetError("\n".join(problems))


def image_files(image: Any) -> List[str]:
    """The file(s) of an item's ``image``: one path, or one per channel (nnU-Net)."""
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


def item_files(item: Dict[str, Any]) -> List[str]:
    """Every file an item reads (its image channels, then its label), without repeats (LA: image = label file)."""
    files = image_files(item["image"]) + ([str(item["label"])] if "label" in item else [])
    return list(dict.fromkeys(files))


def _check_item(item: Dict[str, Any], in_channels: int) -> None:
    files = image_files(item["image"])
    if len(files) == 1:
        shape = volume_shape(files[0], "image")
        spatial = _spatial_shape(files[0], shape, in_channels)
    else:
        if len(files) != in_channels:
            raise DatasetError(f"{files[0]}: {len(files)} channel files for in_channels={in_channels}.")
        shapes = [volume_shape(path, "image") for path in files]
        for path, shape in zip(files, shapes):
            _spatial_shape(path, shape, 1)
            if shape != shapes[0]:
                raise DatasetError(f"{path}: channel shape {shape} differs from {shapes[0]} of {files[0]}.")
        shape = spatial = tuple(shapes[0])
    if "label" in item:
        label_shape = volume_shape(item["label"], "label")
        if tuple(label_shape[:3]) != spatial or any(s != 1 for s in label_shape[3:]):
            raise DatasetError(
                f"{item['label']}: label shape {label_shape} does not match image shape {shape} of {files[0]}."
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


def read_dataset_json(dataset_dir: str) -> Optional[Dict[str, Any]]:
    """``<dataset_dir>/dataset.json`` parsed (nnU-Net v2 or MSD), or ``None`` when there is none. A file that is not
    valid JSON (with the line and column), not an object, or, for MSD, whose ``training`` / ``validation`` /
    ``unlabeled`` / ``test`` entry is not a list of paths or of ``{"image": path[, "label": path]}`` raises
    :class:`DatasetError` naming the file."""
    path = os.path.join(dataset_dir, "dataset.json") if dataset_dir else ""
    if not path or not os.path.isfile(path):
        return None
    spec = load_json(path, DatasetError)
    if not isinstance(spec, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(spec).__name__}.")
    if is_nnunet_v2(spec):
        return spec
    for key in ("training", "validation", "unlabeled", "test"):
        entries = spec.get(key, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(entries).__name__}.")
        for index, entry in enumerate(entries):
            paths = entry if isinstance(entry, dict) else {"image": entry}
            if not isinstance(paths.get("image"), str) or not isinstance(paths.get("label", ""), (str, type(None))):
                raise DatasetError(
                    f'{path}: \'{key}\' entry {index} must be a path or {{"image": path[, "label": path]}}, '
                    f"got {json.dumps(entry)[:120]}."
                )
    return spec


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


def is_nnunet_v2(spec: Optional[Dict[str, Any]]) -> bool:
    """Whether a ``dataset.json`` is nnU-Net v2's (``channel_names``, no ``training`` list) rather than MSD's."""
    return bool(spec) and "channel_names" in spec and "training" not in spec


def label_map(spec: Optional[Dict[str, Any]], path: str = "dataset.json") -> Optional[Dict[str, int]]:
    """The dataset's classes as ``{name: value}`` (nnU-Net v2 ``labels``, or MSD's ``{"0": name}`` inverted), or
    ``None``. Values must be the integers ``0 .. K-1`` (region-based nnU-Net labels, lists of values, are refused)."""
    labels = (spec or {}).get("labels")
    if not labels:
        return None
    if is_nnunet_v2(spec):
        mapping = labels
    else:
        mapping = {name: value for value, name in labels.items()}
    try:
        result = {str(name): int(value) for name, value in mapping.items()}
    except (TypeError, ValueError) as err:
        raise DatasetError(
            f"{path}: labels must map each name to one integer value (region-based labels are not supported): "
            f"{labels}"
        ) from err
    if sorted(result.values()) != list(range(len(result))):
        raise DatasetError(
            f"{path}: label values must be 0, 1, ..., K-1 (background 0), got {sorted(result.values())}."
        )
    return dict(sorted(result.items(), key=lambda kv: kv[1]))


def channel_names(spec: Optional[Dict[str, Any]]) -> Optional[List[str]]:
    """The input channels' names in channel order (nnU-Net v2 ``channel_names``, MSD ``modality``), or ``None``."""
    names = (spec or {}).get("channel_names" if is_nnunet_v2(spec) else "modality")
    if not isinstance(names, dict) or not names:
        return None
    return [str(names[key]) for key in sorted(names, key=int)]


def dataset_description(dataset_dir: str) -> Dict[str, Any]:
    """What ``dataset.json`` says about the network's inputs and outputs: ``in_channels`` (number of channels),
    ``out_channels`` (number of classes, background included), ``channel_names`` and ``labels`` (``{name: value}``).
    Counts the file does not state (or with no ``dataset.json``: LA, folders) are :data:`DEFAULT_CHANNELS`; names it
    does not state are ``None``. ``configs/train.json`` takes its ``in_channels`` / ``out_channels`` from here."""
    spec = read_dataset_json(dataset_dir) if dataset_dir and os.path.isdir(dataset_dir) else None
    path = os.path.join(dataset_dir or "", "dataset.json")
    labels, channels = label_map(spec, path), channel_names(spec)
    return {
        "in_channels": len(channels) if channels else DEFAULT_CHANNELS["in_channels"],
        "out_channels": len(labels) if labels else DEFAULT_CHANNELS["out_channels"],
        "channel_names": channels,
        "labels": labels,
    }


def group_channels(paths: Sequence[str], file_ending: Optional[str], num_channels: int) -> Dict[str, List[str]]:
    """``{case: [channel 0 path, channel 1 path, ...]}`` for nnU-Net file names ``<CASE>_<XXXX><file_ending>``
    (``file_ending`` ``None``: any ending :func:`case_name` strips), sorted by case. Raises :class:`DatasetError`
    naming each file whose name has no channel index and each case whose channels are not exactly ``0000 ..
    num_channels-1``."""
    cases: Dict[str, Dict[int, str]] = {}
    problems = []
    for path in sorted(paths):
        stem = os.path.basename(path)[: -len(file_ending)] if file_ending else case_name(path)
        match = NNUNET_CHANNEL.match(stem)
        if not match:
            problems.append(f"{path}: name does not end in _XXXX{file_ending or '.nii.gz'} (the channel index).")
            continue
        cases.setdefault(match["case"], {})[int(match["channel"])] = path
    for case, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            found = ", ".join(f"{c:04d}" for c in sorted(channels))
            problems.append(
                f"{channels[min(channels)]}: case '{case}' has channel(s) {found}; expected "
                f"{', '.join(f'{c:04d}' for c in range(num_channels))} (in_channels={num_channels})."
            )
    if problems:
        raise DatasetError("\n".join(problems))
    return {case: [channels[c] for c in range(num_channels)] for case, channels in sorted(cases.items())}


def _files_with_ending(folder: Path, ending: str) -> List[str]:
    return (
        sorted(str(p) for p in folder.iterdir() if p.name.endswith(ending) and p.is_file()) if folder.is_dir() else []
    )


def _nnunet_items(dataset_dir: str, spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Items of an nnU-Net v2 raw dataset: ``imagesTr`` cases (labeled when ``labelsTr`` has ``<CASE><ending>``),
    then the ``imagesTs`` cases as unlabeled items. A label without image case, or a ``numTraining`` that differs
    from the number of label files, raises :class:`DatasetError`."""
    root, json_path = Path(dataset_dir), os.path.join(dataset_dir, "dataset.json")
    ending = spec.get("file_ending", ".nii.gz")
    channels = channel_names(spec)
    if not channels:
        raise DatasetError(f"{json_path}: channel_names must map '0', '1', ... to channel names.")
    training = group_channels(_files_with_ending(root / "imagesTr", ending), ending, len(channels))
    labels = {os.path.basename(p)[: -len(ending)]: p for p in _files_with_ending(root / "labelsTr", ending)}
    orphans = [path for case, path in labels.items() if case not in training]
    if orphans:
        raise DatasetError("\n".join(f"{p}: label has no image case in {root / 'imagesTr'}." for p in orphans))
    if "numTraining" in spec and spec["numTraining"] != len(labels):
        raise DatasetError(
            f"{json_path}: numTraining is {spec['numTraining']} but {root / 'labelsTr'} has {len(labels)} label(s)."
        )
    items: List[Dict[str, Any]] = []
    for case, files in training.items():
        item: Dict[str, Any] = {"image": files, "case": case}
        if case in labels:
            item["label"] = labels[case]
        items.append(item)
    test = group_channels(_files_with_ending(root / "imagesTs", ending), ending, len(channels))
    return items + [{"image": files, "case": case} for case, files in test.items()]


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
    spec = read_dataset_json(dataset_dir)
    if is_nnunet_v2(spec):
        items = _nnunet_items(dataset_dir, spec)
    elif spec is not None:
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
            f"{dataset_dir}: no dataset found (expected dataset.json (nnU-Net v2 or MSD), train.list with "
            f"<case>/{LA_FILE_NAME} folders, or imagesTr/ + labelsTr/)."
        )
    labeled = [item for item in items if "label" in item]
    unlabeled = [item for item in items if "label" not in item]
    if num_labeled is not None and num_labeled >= 0:
        if num_labeled > len(labeled):
            raise DatasetError(f"{dataset_dir}: num_labeled={num_labeled} but only {len(labeled)} labeled items.")
        unlabeled = [{k: v for k, v in item.items() if k != "label"} for item in labeled[num_labeled:]] + unlabeled
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
