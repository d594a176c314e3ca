"""MONAI transform chains shared by training, validation and inference.

The deterministic part (:func:`preprocessing`) is the one place that defines how a volume is read and normalised,
so training and inference can never drift apart. It is invertible: inference maps predictions back to the input's
grid with ``Invertd`` against it.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Flipd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    OneOf,
    Orientationd,
    RandRotate90d,
    RandSpatialCropd,
    SpatialPadd,
    Zoomd,
)

from bundle.data import H5Reader


class LoadVolumed(MapTransform):
    """``LoadImaged`` that reads LA ``.h5`` files with :class:`~bundle.data.H5Reader` (dataset = the key's name)
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
            loader = loaders[key]
            item[key] = loader({key: item[key]})[key]
        return item


def preprocessing(keys: Sequence[str] = ("image", "label"), resample_factor: float = 1.0) -> Compose:
    """Deterministic, invertible preprocessing of one item.

    Reads NIfTI (or anything MONAI reads) and LA ``.h5`` files (datasets ``image`` / ``label``), puts the channel
    first, reorients to RAS (a no-op for h5, which has no affine), optionally zooms by ``resample_factor`` (the
    ``cpu`` benchmark protocol uses 0.5; trilinear for the image, nearest for labels) and z-scores the image per
    channel. Output: ``image`` (C, H, W, D) float32 and, if requested, ``label`` (1, H, W, D) float32 class indices.

    Args:
        keys: ``("image",)`` for unlabeled / inference items, ``("image", "label")`` for labeled ones.
        resample_factor: isotropic zoom applied after loading; 1.0 keeps the native grid.
    """
    keys = list(keys)
    transforms = [
        LoadVolumed(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
    ]
    if resample_factor != 1.0:
        modes = ["trilinear" if k == "image" else "nearest" for k in keys]
        transforms.append(Zoomd(keys=keys, zoom=resample_factor, mode=modes, keep_size=False))
    transforms += [NormalizeIntensityd(keys="image", channel_wise=True), EnsureTyped(keys=keys, track_meta=True)]
    return Compose(transforms)


def training_transforms(
    keys: Sequence[str],
    patch_size: Sequence[int],
    resample_factor: float = 1.0,
    augment: bool = False,
) -> Compose:
    """Preprocessing + the random part of training: optional rot90/flip, pad to the patch, uniform random crop.

    Volumes smaller than the patch in some dimension are zero-padded symmetrically to the patch size (the
    released code pads every dimension by ``floor((P-S)/2)+3`` instead; both leave every crop inside the padded
    volume, ours pads no more than needed). The dual-network method uses no augmentation (``augment=False``, as in
    the paper); ``augment=True`` adds the field's ``RandomRotFlip`` of the UA-MT/BCP/SSL4MIS code, used by the
    single-V-Net methods: ``rot90`` by k in {0, 1, 2, 3} in the first two axes, then exactly one flip, along axis 0
    or axis 1 with equal probability (the same draw for image and label).
    Output ``image`` (C, *patch_size), ``label`` (1, *patch_size) when labeled.
    """
    keys = list(keys)
    transforms = list(preprocessing(keys, resample_factor).transforms)
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
    transforms.append(EnsureTyped(keys=keys, track_meta=False))
    return Compose(transforms)
