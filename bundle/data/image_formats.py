"""The image formats an input can have, and whether this installation can read them.

NIfTI (``.nii``, ``.nii.gz``; nibabel, a required package) and the LA benchmark's ``.h5`` are read everywhere.
NRRD files (``.nrrd``, ``.nhdr``) and DICOM series (one folder of slice files per series) are read by MONAI's
``LoadImage`` with whichever of its readers is installed: ``NrrdReader`` (``pip install pynrrd``) or ``ITKReader``
(``pip install itk``) for NRRD, ``PydicomReader`` (``pip install pydicom``) or ``ITKReader`` for DICOM. Each reader
returns the voxel array with a RAS affine, so a mask written as NIfTI lands on the scan's grid.

MONAI chooses the reader by suffix and has no test for "is this folder a DICOM series"; :func:`is_dicom_series`
adds it (the Part-10 ``DICM`` marker), and :func:`check_readable_format` names the package to install before any
work starts instead of MONAI's generic "cannot find a suitable reader".
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Sequence, Tuple

from bundle.config.errors import BundleError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
#: suffixes of single-file volumes (a DICOM series is a folder).
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
#: the suffixes an output name drops: ``case.nii.gz`` -> ``case``.
STRIPPED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".h5")
#: format -> (Python modules of MONAI readers that read it, what to install).
OPTIONAL_READERS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "NRRD": (("nrrd", "itk"), "pip install pynrrd (or itk)"),
    "DICOM": (("pydicom", "itk"), "pip install pydicom (or itk)"),
}
#: files looked at to decide whether a folder is a DICOM series (the first ones, sorted by name).
DICOM_PROBE_FILES = 8


class FormatError(BundleError):
    """An input in a format this installation cannot read (one line naming the file and what to install)."""


def is_dicom_series(folder: str) -> bool:
    """Whether ``folder`` holds DICOM slice files: one of its first :data:`DICOM_PROBE_FILES` files (sorted) ends
    in ``.dcm`` or carries the DICOM Part-10 marker ``DICM`` at byte 128."""
    if not os.path.isdir(folder):
        return False
    with os.scandir(folder) as entries:
        files = sorted(e.path for e in entries if e.is_file())
    for path in files[:DICOM_PROBE_FILES]:
        if path.lower().endswith(".dcm"):
            return True
        with open(path, "rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                return True
    return False


def image_format(path: str) -> str:
    """``"DICOM"`` for a folder, ``"NRRD"``, ``"h5"`` or ``"NIfTI"`` (the default) by suffix."""
    if os.path.isdir(path):
        return "DICOM"
    if path.endswith(NRRD_SUFFIXES):
        return "NRRD"
    return "h5" if path.endswith(".h5") else "NIfTI"


def reader_installed(image_format_name: str) -> bool:
    """Whether a MONAI reader for the format can be imported (NIfTI and h5: always)."""
    modules, _ = OPTIONAL_READERS.get(image_format_name, ((), ""))
    return not modules or any(importlib.util.find_spec(module) is not None for module in modules)


def check_readable_format(paths: Sequence[str]) -> None:
    """Raise :class:`FormatError` naming the first input of each format no installed reader reads, and what to
    install (one line per format)."""
    problems: List[str] = []
    for name, (_, install) in OPTIONAL_READERS.items():
        first = next((p for p in paths if image_format(p) == name), None)
        if first is not None and not reader_installed(name):
            problems.append(f"{first}: reading {name} needs a reader that is not installed: {install}.")
    if problems:
        raise FormatError("\n".join(problems))


def case_name(path: str) -> str:
    """The name an input's outputs get: the file name without its image suffix (:data:`STRIPPED_SUFFIXES`), or the
    folder name of a DICOM series."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in STRIPPED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
