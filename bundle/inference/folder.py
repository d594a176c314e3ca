"""Inference on a folder of NIfTI scans: the papers' sliding-window grid, uncertainty maps, and a robust runner.

``configs/inference.json`` wires these to MONAI's ``SlidingWindowInferer``, ``Invertd`` and ``SaveImage``:

* :func:`strides_to_overlap` turns the papers' window strides into the per-axis ``overlap`` that MONAI needs, so
  that MONAI's scan interval ``int(roi * (1 - overlap))`` is exactly the stride (a naive ``1 - s / roi`` can give
  ``s - 1``: 96 and 16 give 15). :func:`window_starts` is the papers' reference grid, for tests.
* :func:`entropy_map`, :func:`disagreement_map` and :class:`SubnetDisagreement`: the optional uncertainty outputs.
* :func:`image_datalist` lists the input images (:func:`image_datalist_or_exit`: stopping on none);
  :class:`FolderInference` segments them one at a time, reports and skips bad files, writes every output
  atomically, and exits non-zero at the end if any file failed.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
from monai.data import Dataset, NibabelWriter
from monai.data.utils import to_affine_nd
from monai.inferers import Inferer
from monai.transforms import Compose, SaveImage
from monai.utils import convert_data_type
from torch import nn

from bundle.config.errors import BundleError
from bundle.config.paths import PathError, check_outputs_apart, is_pattern, list_files
from bundle.data.checks import stop
from bundle.data.datalists import DatasetError, check_items, group_channels, image_files
from bundle.data.image_formats import VOLUME_SUFFIXES, FormatError, case_name, check_readable_format, is_dicom_series
from bundle.engine.precision import AutocastInference
from bundle.inference.manifest import STAGING_PREFIX, ManifestError, RunManifest, read_manifest, remove_previous_outputs
from bundle.inference.optimization import optimize_for_inference

logger = logging.getLogger(__name__)

#: outputs the runner writes when present after postprocessing: key -> (sub-folder of ``output_dir``, dtype).
OUTPUTS: Dict[str, Tuple[str, type]] = {
    "pred": ("", np.uint8),
    "prob": ("probabilities", np.float32),
    "entropy": ("entropy", np.float32),
    "disagreement": ("disagreement", np.float32),
}


# ------------------------------------------------------------------------------------------- sliding window
def strides_to_overlap(roi_size: Sequence[int], strides: Sequence[int]) -> List[float]:
    """Per-axis ``overlap`` for ``SlidingWindowInferer`` such that ``int(roi * (1 - overlap)) == stride`` exactly.

    MONAI truncates ``roi * (1 - overlap)`` to an int, so the overlap is chosen to put that product half-way
    between ``stride`` and ``stride + 1``: ``1 - (stride + 0.5) / roi``, or 0 when ``stride == roi``.

    Args:
        roi_size: window size per spatial axis, e.g. ``(112, 112, 80)``.
        strides: the papers' window strides per axis, ``1 <= stride <= roi`` (LA ``(18, 18, 4)``, pancreas 16,
            BraTS 64).

    Returns:
        one overlap in ``[0, 1)`` per axis.
    """
    if len(roi_size) != len(strides):
        raise ValueError(f"roi_size {list(roi_size)} and strides {list(strides)} differ in length.")
    overlaps = []
    for roi, stride in zip(roi_size, strides):
        if not 1 <= stride <= roi:
            raise ValueError(f"each stride must be in [1, roi]; got stride {stride} for roi {roi}.")
        overlaps.append(0.0 if stride == roi else 1.0 - (stride + 0.5) / roi)
    return overlaps


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], strides: Sequence[int]) -> List[List[int]]:
    """The papers' sliding-window grid: per axis, ``n = ceil((S - P) / s) + 1`` windows starting at
    ``min(s * i, S - P)``. An axis with ``S <= P`` is padded to ``P`` and has the single start 0.

    Args:
        image_size: spatial size ``S`` per axis.
        roi_size: window size ``P`` per axis.
        strides: stride ``s`` per axis.

    Returns:
        the list of window starts of each axis.
    """
    starts = []
    for size, roi, stride in zip(image_size, roi_size, strides):
        if size <= roi:
            starts.append([0])
            continue
        count = math.ceil((size - roi) / stride) + 1
        starts.append([min(stride * i, size - roi) for i in range(count)])
    return starts


# -------------------------------------------------------------------------------------------- uncertainty
def entropy_map(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy ``-sum_c p_c log p_c`` (nats, in ``[0, log C]``) of class probabilities over ``dim``, keeping ``dim``
    with size 1: ``(N, C, *S) -> (N, 1, *S)`` for ``dim=1``."""
    return torch.special.entr(prob).sum(dim=dim, keepdim=True)


def disagreement_map(prob_a: torch.Tensor, prob_b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Disagreement of two subnets: the total-variation distance ``0.5 * sum_c |p_A,c - p_B,c|`` in ``[0, 1]``
    (for two classes, ``|p_A,fg - p_B,fg|``); ``(N, C, *S) x2 -> (N, 1, *S)``."""
    return 0.5 * (prob_a - prob_b).abs().sum(dim=dim, keepdim=True)


class SubnetDisagreement(nn.Module):
    """Wraps the ensemble (submodules ``net_a`` and ``net_b`` returning logits) for ``SlidingWindowInferer``.

    ``forward(x)``: ``(N, in_channels, *S)`` -> ``(prob (N, C, *S), disagreement (N, 1, *S))``, where ``prob`` is
    the mean of the two softmaxes, exactly the ensemble's output (docs/methods/dual_network.md §1), and both are
    stitched by the inferer like any output; both are fp32 also under autocast.
    """

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        if not (hasattr(ensemble, "net_a") and hasattr(ensemble, "net_b")):
            raise ValueError("the uncertainty maps need an ensemble with submodules `net_a` and `net_b`.")
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        prob_a = torch.softmax(self.ensemble.net_a(x).float(), dim=1)
        prob_b = torch.softmax(self.ensemble.net_b(x).float(), dim=1)
        return 0.5 * (prob_a + prob_b), disagreement_map(prob_a, prob_b)


# ------------------------------------------------------------------------------------------------- inputs
#: what an inference folder may hold, for the error when it holds none of it.
INPUT_FORMATS = "(.nii / .nii.gz / .nrrd / .nhdr files, or DICOM series folders)"


def image_datalist(dataset_dir: str, in_channels: int = 1) -> List[Dict[str, Any]]:
    """``[{"image": path or [channel paths], "case": name}, ...]``, sorted by case, for the scans of a folder (not
    recursive; its name is literal, ``[`` ``]`` included) or matching a glob pattern (a path that is not a folder;
    :func:`bundle.config.paths.list_files`). A scan is a NIfTI or NRRD file, or a DICOM series: a sub-folder of slice
    files, or ``dataset_dir`` itself when it is one series (:mod:`bundle.data.image_formats`). ``case`` names the
    outputs: the file name without its suffix, the series' folder name.

    nnU-Net names (``imagesTs/``): with ``in_channels`` > 1 the files ``<CASE>_0000 .. <CASE>_<C-1>`` are one case,
    stacked in channel order; with one channel, when every file ends in ``_0000``, that suffix is dropped from the
    case name. Any other file is one case named by its file name.

    Raises:
        DatasetError: when nothing matches, when channel files are missing, when a DICOM series is given to a model
            of several channels, or when two inputs would write the same output name (``a.nii`` and ``a.nrrd``).
        FormatError: when no installed reader reads one of the formats found (naming what to install).
    """
    paths = list_files(dataset_dir, VOLUME_SUFFIXES)
    series = dicom_series(dataset_dir)
    if not paths and not series:
        where = "folder" if os.path.isdir(dataset_dir) else "pattern (no such folder)"
        raise DatasetError(f"{dataset_dir}: no images found in this {where} {INPUT_FORMATS}.")
    check_readable_format(paths + series)
    if in_channels > 1:
        if series:
            raise DatasetError(
                f"{series[0]}: a DICOM series is one channel, but the model takes {in_channels}; give one file per "
                "channel named <CASE>_0000, <CASE>_0001, ... (NIfTI or NRRD)."
            )
        cases = group_channels(paths, None, in_channels)
    else:
        stems = {path: case_name(path) for path in paths + series}
        nnunet = bool(paths) and all(stem.endswith("_0000") for stem in stems.values())
        cases = {}
        for path, stem in stems.items():
            name = stem[: -len("_0000")] if nnunet else stem
            if name in cases:
                raise DatasetError(f"{path} and {cases[name]} would both be written as '{name}.nii.gz'.")
            cases[name] = path
    return [{"image": image, "case": case} for case, image in sorted(cases.items())]


def dicom_series(dataset_dir: str) -> List[str]:
    """The DICOM series of an inference folder: its sub-folders that hold DICOM files, sorted, or ``[dataset_dir]``
    when the folder itself is one series (no series in a glob pattern)."""
    if not os.path.isdir(dataset_dir):
        return []
    if is_dicom_series(dataset_dir):
        return [dataset_dir]
    with os.scandir(dataset_dir) as entries:
        folders = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
    return [folder for folder in folders if is_dicom_series(folder)]


def image_datalist_or_exit(dataset_dir: str, in_channels: int = 1) -> List[Dict[str, Any]]:
    """:func:`image_datalist` for ``configs/inference.json``: raises its one-line report under the title "Cannot
    segment:" (no images, no such folder, missing channels, two inputs with one output name, no reader installed)."""
    try:
        return image_datalist(dataset_dir, in_channels)
    except (DatasetError, FormatError) as err:
        stop("Cannot segment:", str(err).splitlines())


# ------------------------------------------------------------------------------------------------- writing
class NiftiHeaderWriter(NibabelWriter):
    """``NibabelWriter`` that keeps the input's ``qform_code``, ``sform_code`` and ``xyzt_units``.

    MONAI's ``NibabelWriter`` always writes qform/sform code 1 ("scanner"), whatever the input had; this writer
    copies the three fields from the metadata that ``LoadImage`` read from the input header (falling back to
    MONAI's behaviour when they are absent, e.g. for h5 inputs), so an output's header matches its input's.
    """

    HEADER_FIELDS = ("qform_code", "sform_code", "xyzt_units")

    def __init__(self, output_dtype: type = np.float32, **kwargs) -> None:
        super().__init__(output_dtype=output_dtype, **kwargs)
        self.header_fields: Dict[str, int] = {}

    def set_metadata(self, meta_dict: Optional[dict], resample: bool = True, **options) -> None:
        super().set_metadata(meta_dict, resample=resample, **options)
        self.header_fields = {k: int(np.asarray(meta_dict[k])) for k in self.HEADER_FIELDS if k in (meta_dict or {})}

    def write(self, filename: str, verbose: bool = False, **obj_kwargs) -> None:
        image = self.create_backend_obj(self.data_obj, affine=self.affine, dtype=self.output_dtype, **obj_kwargs)
        affine = to_affine_nd(3, convert_data_type(np.eye(4) if self.affine is None else self.affine, np.ndarray)[0])
        image.set_sform(affine, code=self.header_fields.get("sform_code", 1))
        image.set_qform(affine, code=self.header_fields.get("qform_code", 1))
        if "xyzt_units" in self.header_fields:
            image.header["xyzt_units"] = self.header_fields["xyzt_units"]
        nib.save(image, filename)
        if verbose:
            logger.info(f"file written: {filename}.")


# -------------------------------------------------------------------------------------------------- runner
class FolderInference:
    """Segments every item of ``dataset`` one at a time; the ``evaluator`` of ``configs/inference.json``.

    Per item: check the header (readable, 3D with ``in_channels`` channels), preprocess (``dataset.transform``),
    run ``inferer`` with ``network`` (optionally wrapped in :class:`SubnetDisagreement`), apply
    ``postprocessing`` (``Invertd`` to the input grid, argmax, ...), then write every key of :data:`OUTPUTS`
    present in the result with ``SaveImage``: ``output_dir/<name>.nii.gz`` (mask, uint8), and when present
    ``probabilities/`` (C-channel 4D), ``entropy/`` and ``disagreement/``, each with the input's affine, header
    codes and shape.

    Robustness: a file that fails at any step (unreadable, truncated, non-finite voxels: the preprocessing's
    :class:`~bundle.data.transforms.CheckVolumed`) is logged with its reason and skipped, and the others are still
    written. Outputs are written into a hidden staging folder (``.partial-*``) inside ``output_dir`` and moved into
    place with ``os.replace``, so a final name never holds a half-written file; staging folders left by an
    interrupted run are removed at the start. After the last item, if any failed, :meth:`run` raises
    :class:`~bundle.config.errors.BundleError` with the list of failures (exit status 1 on the command line).

    Inputs are never overwritten: before anything is read, an ``output_dir`` (or one of its sub-folders) that is a
    folder holding inputs, under any spelling, or whose outputs the input pattern would match, stops the run
    (:func:`bundle.config.paths.check_outputs_apart`). Each run writes ``output_dir/manifest.json`` (inputs, outputs,
    settings, model, times; :mod:`bundle.inference.manifest`) and first removes the outputs listed in the previous run's
    manifest, and nothing else.

    Args:
        dataset: a MONAI ``Dataset`` of ``{"image": path}`` items whose ``transform`` is the preprocessing.
        network: maps ``(1, in_channels, *roi)`` to class probabilities ``(1, C, *roi)`` (the ensemble).
        inferer: e.g. ``SlidingWindowInferer``; it receives the image on the CPU, so set its ``sw_device`` to the
            network's device (and ``device="cpu"`` to stitch large volumes in RAM).
        postprocessing: applied to ``{"image", "pred" (C, *S) probabilities, ["entropy", "disagreement"]}``.
        output_dir: destination folder, created if needed.
        ckpt_path: state dict loaded (strictly) into ``network`` before the first item; ``None`` keeps its weights.
        in_channels: channels the network expects; inputs with another count are rejected.
        save_uncertainty: also compute ``entropy`` (of the averaged softmax) and ``disagreement`` (between the
            subnets; needs ``network.net_a`` / ``network.net_b``).
        optimize_network: after loading the weights, fold the BatchNorms into the convolutions and store the weights
            channels-last (:func:`bundle.inference.optimization.optimize_for_inference`): the same outputs within float
            rounding, about 1.7x faster on CPU (docs/RESULTS.md, speed table).
        precision: ``fp32`` | ``bf16`` | ``fp16`` | ``auto`` (:mod:`bundle.engine.precision`; resolved on the device of
            ``network``'s parameters): the autocast of each window's forward (:class:`AutocastInference`); the
            probabilities are fp32 and stitched in fp32 whatever it is.
        dataset_dir: the folder or glob the inputs were listed from; a folder counts as an input folder, and a
            pattern must not match the outputs (see above).
        settings: the run's settings, recorded in the manifest with the runner's own.
    """

    def __init__(
        self,
        dataset: Dataset,
        network: nn.Module,
        inferer: Inferer,
        postprocessing: Compose,
        output_dir: str,
        ckpt_path: Optional[str] = None,
        in_channels: int = 1,
        save_uncertainty: bool = False,
        optimize_network: bool = True,
        precision: str = "fp32",
        dataset_dir: Optional[str] = None,
        settings: Optional[Dict] = None,
    ) -> None:
        self.dataset = dataset
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.output_dir = output_dir
        self.ckpt_path = ckpt_path
        self.in_channels = in_channels
        self.optimize_network = optimize_network
        self.dataset_dir = dataset_dir
        self.settings = {
            **(settings or {}),
            "in_channels": in_channels,
            "save_uncertainty": save_uncertainty,
            "optimize_network": optimize_network,
            "precision": precision,
        }
        device = next(network.parameters(), torch.empty(0)).device
        self.predictor = AutocastInference(
            SubnetDisagreement(network) if save_uncertainty else network, precision, device
        )

    def run(self) -> Dict[str, list]:
        """Segment all items. Returns ``{"written": [output paths], "failed": []}``; raises
        :class:`~bundle.config.errors.BundleError` listing ``file: reason`` for each failed item when any failed."""
        inputs = [path for item in getattr(self.dataset, "data", []) for path in image_files(item["image"])]
        self._check_output_dir(inputs)
        if self.ckpt_path is not None:
            self._load_weights()
        self.network.eval()
        if self.optimize_network:
            optimize_for_inference(self.network)
        os.makedirs(self.output_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(self.output_dir), f"{STAGING_PREFIX}*")):
            # staging folders (and manifest files) of an interrupted run
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
        remove_previous_outputs(self.output_dir, protected=inputs)
        manifest = RunManifest(self.output_dir, inputs, self.settings, self.ckpt_path)
        manifest.write()
        written: List[str] = []
        failed: List[Tuple[str, str]] = []
        total = len(self.dataset)
        for index in range(total):
            path = image_files(self.dataset.data[index]["image"])[0]
            start = time.perf_counter()
            try:
                outputs = self._segment(index)
            except Exception as err:  # any failure of one file must not stop the others
                failed.append((path, _reason(err)))
                manifest.add_failure(*failed[-1])
                logger.error(f"[{index + 1}/{total}] FAILED {path}: {failed[-1][1]}")
                continue
            written += outputs
            manifest.add_outputs(self._files(outputs))
            logger.info(f"[{index + 1}/{total}] {path} -> {outputs[0]} ({time.perf_counter() - start:.1f} s)")
        manifest.add_outputs(self._finish_outputs())
        manifest.finish()
        summary = f"{total - len(failed)} of {total} images segmented into {self.output_dir}"
        if failed:
            raise BundleError(f"{summary}; {len(failed)} failed:", [f"{p}: {r}" for p, r in failed])
        logger.info(summary)
        return {"written": written, "failed": failed}

    def _output_subfolders(self) -> List[str]:
        """The sub-folders of ``output_dir`` this runner writes into."""
        return [folder for folder, _ in OUTPUTS.values() if folder]

    def _files(self, outputs: List[str]) -> List[str]:
        """The files among what :meth:`_save` returned (the output paths), for the manifest."""
        return outputs

    def _finish_outputs(self) -> List[str]:
        """Write what is written once after the last item (nothing here); return the files written."""
        return []

    def _check_output_dir(self, inputs: List[str]) -> None:
        """Stop, naming both paths, when ``output_dir`` would overwrite or mix with the inputs, or holds a manifest
        that cannot be read, before anything is read (:func:`bundle.config.paths.check_outputs_apart`)."""
        folder = self.dataset_dir if self.dataset_dir and os.path.isdir(self.dataset_dir) else None
        pattern = self.dataset_dir if self.dataset_dir and is_pattern(self.dataset_dir) else None
        try:
            check_outputs_apart(
                inputs,
                self.output_dir,
                self._output_subfolders(),
                input_pattern=pattern,
                output_names=[f"{case_name(p)}.nii.gz" for p in inputs],
                input_folders=([folder] if folder else []) + [p for p in inputs if os.path.isdir(p)],  # DICOM series
            )
            read_manifest(self.output_dir)
        except (PathError, ManifestError) as err:
            stop("Cannot segment:", str(err).splitlines())

    def _load_weights(self) -> None:
        """Load ``ckpt_path`` strictly into ``network``; stop with one line naming the file when it is missing, not
        readable (truncated, not a ``torch.save`` file) or does not fit the network (another ``base_width``, channel
        count or norm, or a resume checkpoint instead of ``model.pt``), before anything is written."""
        path = self.ckpt_path
        if not os.path.isfile(path):
            stop("Cannot segment:", [f"{path}: no trained weights (train first, or set ckpt_path)."])
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated zip, a 0-byte file, a foreign pickle
            stop("Cannot segment:", [f"{path}: not a complete weights file, truncated or corrupt ({_reason(err)})."])
        try:
            self.network.load_state_dict(state)
        except Exception as err:  # missing / unexpected keys, shape mismatches
            reason = " ".join(str(err).split())
            stop(
                "Cannot segment:",
                [
                    f"{path}: the weights do not fit the network; pass the model's in_channels, out_channels, "
                    f"base_width and norm as for training, and give the model.pt that training writes "
                    f"({reason[:300]}{'...' if len(reason) > 300 else ''})."
                ],
            )

    def _segment(self, index: int) -> List[str]:
        check_items([self.dataset.data[index]], self.in_channels)
        data = self.dataset[index]
        with torch.no_grad():
            output = self.inferer(data["image"][None], self.predictor)
        if isinstance(output, (tuple, list)):
            data["pred"], data["disagreement"] = output[0][0], output[1][0]
            data["entropy"] = entropy_map(data["pred"], dim=0)
        else:
            data["pred"] = output[0]
        data = self.postprocessing(data)
        return self._save(data)

    def _save(self, data: dict) -> List[str]:
        staging = tempfile.mkdtemp(prefix=".partial-", dir=self.output_dir)
        try:
            staged = []
            for key, (folder, dtype) in OUTPUTS.items():
                if key not in data:
                    continue
                saver = SaveImage(
                    output_dir=os.path.join(staging, key),
                    output_postfix="",
                    output_dtype=dtype,
                    separate_folder=False,
                    print_log=False,
                    writer=NiftiHeaderWriter,
                    savepath_in_metadict=True,
                )
                staged.append((saver(data[key]).meta["saved_to"], os.path.join(self.output_dir, folder)))
            finals = []
            name = data.get("case") or case_name(str(data["image"].meta["filename_or_obj"]))
            for source, folder in staged:
                os.makedirs(folder, exist_ok=True)
                finals.append(os.path.join(folder, f"{name}.nii.gz"))
                os.replace(source, finals[-1])
            return finals
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _reason(err: BaseException) -> str:
    """The innermost cause of an error on one line (MONAI wraps transform errors in ``RuntimeError("applying
    transform")``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
