"""MONAI transform chains shared by training, validation and inference.

The deterministic part (:func:`preprocessing`) is the one place that defines how a volume is read and normalised,
so training and inference can never drift apart. It is invertible: inference maps predictions back to the input's
grid with ``Invertd`` against it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Flipd,
    Lambdad,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    OneOf,
    Orientationd,
    RandRotate90d,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
    Zoomd,
)

from bundle.data.datalists import DatasetError, H5Reader

#: largest difference (in the affine's units, mm) tolerated between an image's and its label's affine.
AFFINE_TOLERANCE = 1e-3


class LoadVolumed(MapTransform):
    """``LoadImaged`` that reads LA ``.h5`` files with :class:`~bundle.data.datalists.H5Reader` (dataset = the key's name)
    and every other file with MONAI's default readers.

    Giving ``LoadImaged`` the h5 reader directly would make it try that reader first on every NIfTI file and log a
    failure for each; choosing by suffix avoids both the noise and the wasted attempt.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys)
        self.h5_loaders = {key: LoadImaged(keys=key, reader=H5Reader(dataset=key), image_only=True) for key in keys}
        self.default_loaders = {key: LoadImaged(keys=key, image_only=True) for key in keys}

    def __call__(self, data: Mapping) -> Dict:
        item = dict(data)
        for key in self.key_iterator(item):
            loaders = self.h5_loaders if str(item[key]).endswith(".h5") else self.default_loaders
            try:
                item[key] = loaders[key]({key: item[key]})[key]
            except DatasetError:
                raise
            except Exception as err:  # name the file: MONAI's error names the transform, not the file
                while err.__cause__ is not None:
                    err = err.__cause__
                raise DatasetError(
                    f"{item[key]}: cannot be read to the end ({type(err).__name__}: {' '.join(str(err).split())})"
                ) from err
        return item


class CheckVolumed(MapTransform):
    """Voxel checks of one loaded item (channel first, before reorientation: ``image`` (C, H, W, D), ``label``
    (1, H, W, D) MetaTensors); raises :class:`DatasetError` listing every problem, one line each, naming the file.

    * every key: all voxels finite (one NaN spreads over the whole volume with z-scoring);
    * ``label``: integer class indices in ``[0, num_classes)`` (``num_classes=None`` skips the range);
    * ``label`` vs ``image``: affines equal within ``affine_tolerance`` (a label flipped in x would otherwise be
      reoriented differently from its image and train silently misaligned).

    MONAI has no such check transform (``DataStatsd`` only logs). Returns the item unchanged.
    """

    def __init__(
        self, keys: Sequence[str], num_classes: Optional[int] = None, affine_tolerance: float = AFFINE_TOLERANCE
    ) -> None:
        super().__init__(keys)
        self.num_classes = num_classes
        self.affine_tolerance = affine_tolerance

    def __call__(self, data: Mapping) -> Mapping:
        problems: List[str] = []
        for key in self.key_iterator(data):
            volume = data[key]
            path = volume.meta.get("filename_or_obj", key)
            values = volume.as_tensor() if hasattr(volume, "as_tensor") else torch.as_tensor(volume)
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                problems.append(f"{path}: {bad} non-finite voxel(s) (NaN or Inf) in the {key}")
            elif key == "label":
                problems += self._label_problems(path, values)
        if "label" in self.keys and "image" in data and "label" in data:
            image, label = data["image"], data["label"]
            difference = float(np.abs(np.asarray(image.affine) - np.asarray(label.affine)).max())
            if difference > self.affine_tolerance:
                problems.append(
                    f"{label.meta.get('filename_or_obj')}: label affine differs from the image's "
                    f"({image.meta.get('filename_or_obj')}) by up to {difference:.4g} "
                    f"(tolerance {self.affine_tolerance})"
                )
        if problems:
            raise DatasetError("\n".join(problems))
        return data

    def _label_problems(self, path: str, label: torch.Tensor) -> List[str]:
        problems = []
        if bool((label != torch.round(label)).any()):
            problems.append(f"{path}: label has non-integer values (expected class indices)")
        if self.num_classes is not None:
            outside = (label < 0) | (label >= self.num_classes)
            if bool(outside.any()):
                values = torch.unique(label[outside])[:5].tolist()
                problems.append(
                    f"{path}: label values {values} outside [0, {self.num_classes}) (out_channels={self.num_classes})"
                )
        return problems


def check_volume_transforms(keys: Sequence[str], num_classes: Optional[int] = None) -> list:
    """What follows :class:`LoadVolumed` to check an item: channel first, then :class:`CheckVolumed`."""
    return [EnsureChannelFirstd(keys=list(keys)), CheckVolumed(keys=list(keys), num_classes=num_classes)]


class ClipChanneld(MapTransform):
    """Clip each channel ``c`` of ``keys`` to ``[lower[c], upper[c]]`` (MONAI's clipping transforms take one range for
    all channels). Used by the CT normalisation (:func:`intensity_transforms`)."""

    def __init__(self, keys: Sequence[str], lower: Sequence[float], upper: Sequence[float]) -> None:
        super().__init__(keys)
        self.lower, self.upper = list(lower), list(upper)

    def __call__(self, data: Mapping) -> Dict:
        item = dict(data)
        for key in self.key_iterator(item):
            image = item[key]
            if image.shape[0] != len(self.lower):
                raise DatasetError(
                    f"{image.meta.get('filename_or_obj', key)}: {image.shape[0]} channel(s), the CT statistics have "
                    f"{len(self.lower)}."
                )
            shape = (-1,) + (1,) * (image.ndim - 1)
            lower = torch.as_tensor(self.lower, dtype=image.dtype, device=image.device).view(shape)
            upper = torch.as_tensor(self.upper, dtype=image.dtype, device=image.device).view(shape)
            item[key] = torch.maximum(torch.minimum(image, upper), lower)
        return item


def intensity_transforms(intensity: Union[str, Dict[str, Any], None] = None) -> list:
    """The intensity normalisation of ``image`` (:mod:`bundle.data.settings`): ``"zscore"`` / ``{"scheme":
    "zscore"}`` / ``None``: each channel z-scored on its own (``NormalizeIntensityd``); ``{"scheme": "ct", "lower",
    "upper", "mean", "std"}`` (one value per channel): clipped to ``[lower, upper]``, then ``(x - mean) / std``."""
    scheme = intensity.get("scheme") if isinstance(intensity, dict) else (intensity or "zscore")
    if scheme == "zscore":
        return [NormalizeIntensityd(keys="image", channel_wise=True)]
    if (
        scheme == "ct"
        and isinstance(intensity, dict)
        and all(k in intensity for k in ("lower", "upper", "mean", "std"))
    ):
        return [
            ClipChanneld(keys=["image"], lower=intensity["lower"], upper=intensity["upper"]),
            NormalizeIntensityd(
                keys="image", subtrahend=intensity["mean"], divisor=intensity["std"], channel_wise=True
            ),
        ]
    raise DatasetError(
        f"intensity {intensity!r}: expected 'zscore' or the CT statistics of a dataset (bundle.data.settings)."
    )


def preprocessing(
    keys: Sequence[str] = ("image", "label"),
    resample_factor: float = 1.0,
    num_classes: Optional[int] = None,
    check: bool = True,
    spacing: Optional[Sequence[float]] = None,
    intensity: Union[str, Dict[str, Any], None] = None,
) -> Compose:
    """Deterministic, invertible preprocessing of one item.

    Reads NIfTI (or anything MONAI reads; a list of files is stacked as channels) and LA ``.h5`` files (datasets
    ``image`` / ``label``), puts the channel first, reorients to RAS (a no-op for h5, which has no affine), resamples
    to ``spacing`` (``Spacingd``: bilinear for the image, nearest for labels), optionally zooms by
    ``resample_factor`` (the ``cpu`` benchmark protocol uses 0.5; trilinear for the image, nearest for labels) and
    normalises the image's intensities (:func:`intensity_transforms`; default: z-score per channel). Output:
    ``image`` (C, H, W, D) float32 and, if requested, ``label`` (1, H, W, D) float32 class indices.

    Args:
        keys: ``("image",)`` for unlabeled / inference items, ``("image", "label")`` for labeled ones.
        resample_factor: isotropic zoom applied after loading; 1.0 keeps the grid.
        num_classes: with ``check``, label values must lie in ``[0, num_classes)``; ``None`` skips that test.
        check: :class:`CheckVolumed` right after loading (finite voxels, label values, label affine); a failure
            raises :class:`~bundle.data.datalists.DatasetError` naming the file.
        spacing: target voxel size ``[x, y, z]`` (mm, RAS axes); ``None`` keeps the native grid.
        intensity: the intensity scheme and its statistics (:func:`intensity_transforms`).
    """
    keys = list(keys)
    transforms = [LoadVolumed(keys=keys)]
    transforms += check_volume_transforms(keys, num_classes) if check else [EnsureChannelFirstd(keys=keys)]
    transforms.append(Orientationd(keys=keys, axcodes="RAS", labels=None))
    if spacing is not None:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        transforms.append(Spacingd(keys=keys, pixdim=[float(v) for v in spacing], mode=modes))
    if resample_factor != 1.0:
        modes = ["trilinear" if k == "image" else "nearest" for k in keys]
        transforms.append(Zoomd(keys=keys, zoom=resample_factor, mode=modes, keep_size=False))
    transforms += intensity_transforms(intensity) + [EnsureTyped(keys=keys, track_meta=True)]
    return Compose(transforms)


#: the key of a training item that keeps its label file's path (:func:`training_transforms`).
LABEL_FILE_KEY = "label_file"


def source_file(volume: Any) -> str:
    """The file a ``MetaTensor`` was read from (``""`` without metadata)."""
    return str(getattr(volume, "meta", {}).get("filename_or_obj", ""))


def training_transforms(
    keys: Sequence[str],
    patch_size: Sequence[int],
    resample_factor: float = 1.0,
    augment: bool = False,
    num_classes: Optional[int] = None,
    check: bool = True,
    spacing: Optional[Sequence[float]] = None,
    intensity: Union[str, Dict[str, Any], None] = None,
) -> Compose:
    """Preprocessing + the random part of training: optional rot90/flip, pad to the patch, uniform random crop.

    Volumes smaller than the patch in some dimension are zero-padded symmetrically to the patch size (the
    released code pads every dimension by ``floor((P-S)/2)+3`` instead; both leave every crop inside the padded
    volume, ours pads no more than needed). The dual-network method uses no augmentation (``augment=False``, as in
    the paper); ``augment=True`` adds the field's ``RandomRotFlip`` of the UA-MT/BCP/SSL4MIS code, used by the
    single-V-Net methods: ``rot90`` by k in {0, 1, 2, 3} in the first two axes, then exactly one flip, along axis 0
    or axis 1 with equal probability (the same draw for image and label).
    Output ``image`` (C, *patch_size), ``label`` (1, *patch_size) and ``label_file`` (its path, so that a bad label
    value found in a batch names its file) when labeled. ``num_classes`` and ``check``: see :func:`preprocessing`,
    like ``spacing`` and ``intensity``.
    """
    keys = list(keys)
    transforms = list(preprocessing(keys, resample_factor, num_classes, check, spacing, intensity).transforms)
    if augment:  # before the crop, as in the released code, so a non-square patch keeps its shape
        transforms += [
            # MONAI draws k in {1, ..., max_k} when it rotates: prob 3/4 makes k uniform in {0, 1, 2, 3}
            RandRotate90d(keys=keys, prob=0.75, max_k=3, spatial_axes=(0, 1)),
            OneOf([Flipd(keys=keys, spatial_axis=0), Flipd(keys=keys, spatial_axis=1)]),
        ]
    transforms += [
        SpatialPadd(keys=keys, spatial_size=list(patch_size), mode="constant"),
        RandSpatialCropd(keys=keys, roi_size=list(patch_size), random_size=False),
    ]
    if "label" in keys:
        transforms.append(Lambdad(keys="label", func=source_file, overwrite=LABEL_FILE_KEY))
    transforms.append(EnsureTyped(keys=keys, track_meta=False))
    return Compose(transforms)
