"""Evaluation reports: per-case metrics (``metrics.csv``), their summary (``summary.json``) and one figure per case.

Two entry points share :class:`MetricsReport`:

* :func:`evaluate_folders` compares a folder of predicted label maps with a folder of ground-truth label maps
  (NIfTI files paired by case name), as ``scripts/evaluate.py`` and ``configs/evaluate.json``'s ``score_masks`` do
  (:func:`score_mask_folders`);
* :class:`MetricsReportHandler` is an ignite handler for MONAI's ``SupervisedEvaluator``
  (``configs/evaluate.json``), scoring a trained model on a labeled list.

Metrics are those of :mod:`bundle.inference.metrics` (medpy semantics, papers' empty-prediction convention); HD95 and
ASD are in voxels, and also in mm (``hd95_mm``, ``asd_mm``) when the label file carries a voxel size (NIfTI);
sensitivity and precision come last.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events
from matplotlib.figure import Figure
from monai.transforms import Compose, EnsureChannelFirstd

from bundle.config.booleans import parse_bool
from bundle.config.errors import BundleError
from bundle.config.paths import check_outputs_apart
from bundle.data.datalists import LA_FILE_NAME
from bundle.data.image_formats import NIFTI_SUFFIXES, case_name
from bundle.data.transforms import LoadVolumed
from bundle.inference.metrics import case_metrics

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- figures
def figure_slices(label: np.ndarray, pred: np.ndarray, num_slices: int = 3) -> List[int]:
    """Indices along the last axis for a case figure: ``num_slices`` evenly spread (quantiles) over the slices
    holding ground-truth foreground, else prediction foreground, else over the whole volume."""
    for mask in (label > 0, pred > 0, np.ones_like(label, dtype=bool)):
        holding = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
        if holding.size:
            positions = np.linspace(0, holding.size - 1, num_slices + 2)[1:-1]
            return sorted({int(holding[int(round(p))]) for p in positions})
    return []


def save_case_figure(
    path: str,
    label: np.ndarray,
    pred: np.ndarray,
    image: Optional[np.ndarray] = None,
    num_slices: int = 3,
    title: str = "",
) -> None:
    """PNG of a few slices (last axis) with the ground-truth (green) and prediction (red) contours.

    Args:
        path: output ``.png`` path.
        label: ground-truth label map ``(H, W, D)``; contours are drawn around ``label > 0``.
        pred: predicted label map ``(H, W, D)``.
        image: optional intensity image ``(H, W, D)`` shown in grey underneath; black otherwise.
        num_slices: number of slices (see :func:`figure_slices`).
        title: figure title (e.g. the case name and its Dice).

    Drawn with matplotlib's object API (``Figure``, rendered by Agg), which never touches pyplot's global state.
    """
    slices = figure_slices(label, pred, num_slices)
    figure = Figure(figsize=(3.2 * len(slices), 3.6))
    for column, z in enumerate(slices, start=1):
        axis = figure.add_subplot(1, len(slices), column)
        background = np.zeros(label.shape[:2]) if image is None else image[..., z]
        axis.imshow(background.T, cmap="gray", origin="lower")
        for mask, colour in ((label[..., z] > 0, "lime"), (pred[..., z] > 0, "red")):
            if mask.any() and not mask.all():
                axis.contour(mask.T.astype(np.uint8), levels=[0.5], colors=colour, linewidths=1.0)
        axis.set_title(f"slice {z}", fontsize=9)
        axis.axis("off")
    figure.suptitle(f"{title}   (green: ground truth, red: prediction)", fontsize=9)
    figure.savefig(path, dpi=100, bbox_inches="tight")


# -------------------------------------------------------------------------------------------------- report
def summarize(rows: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Per metric column: ``mean``, ``std`` (population, ``ddof=0``) and ``n``, over the cases where the value is
    defined (not nan); ``case`` is skipped."""
    summary = {}
    for column in rows[0] if rows else []:
        if column == "case":
            continue
        values = np.array([row[column] for row in rows if column in row], dtype=np.float64)
        values = values[~np.isnan(values)]
        mean, std = (float(values.mean()), float(values.std())) if values.size else (math.nan, math.nan)
        summary[column] = {"mean": mean, "std": std, "n": int(values.size)}
    return summary


def format_summary(summary: Dict[str, Dict[str, float]]) -> str:
    """One ``name  mean ± std  (n=...)`` line per metric."""
    return "\n".join(f"{name:<10} {s['mean']:.4f} ± {s['std']:.4f}  (n={s['n']})" for name, s in summary.items())


class MetricsReport:
    """Collects per-case metrics and writes ``metrics.csv``, ``summary.json`` and ``figures/<case>.png``.

    Args:
        output_dir: destination folder, created if needed.
        classes: ``None`` for the binary "any foreground" metrics (columns ``dice, jaccard, hd95, asd, sensitivity,
            precision``), or the class indices to score one by one (columns ``dice_1, ...``); see
            :func:`bundle.inference.metrics.case_metrics`.
        num_slices: slices per case figure; 0 writes no figures.
    """

    def __init__(self, output_dir: str, classes: Optional[Sequence[int]] = None, num_slices: int = 3) -> None:
        self.output_dir = output_dir
        self.classes = classes
        self.num_slices = num_slices
        self.rows: List[Dict[str, float]] = []
        self.empty_predictions: List[str] = []

    def add(
        self,
        case: str,
        pred: np.ndarray,
        label: np.ndarray,
        spacing: Optional[Sequence[float]] = None,
        image: Optional[np.ndarray] = None,
    ) -> Dict[str, float]:
        """Score one case (label maps ``(H, W, D)`` of one shape; ``spacing`` in mm adds the ``_mm`` columns),
        draw its figure, and return its ``metrics.csv`` row."""
        if any(row["case"] == case for row in self.rows):
            raise ValueError(f"case '{case}' is evaluated twice; case names must be unique.")
        row = {"case": case, **case_metrics(pred, label, self.classes, spacing)}
        self.rows.append(row)
        if not np.any(pred > 0):
            self.empty_predictions.append(case)
        if self.num_slices > 0:
            os.makedirs(os.path.join(self.output_dir, "figures"), exist_ok=True)
            dice = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("dice"))
            figure_path = os.path.join(self.output_dir, "figures", f"{case}.png")
            save_case_figure(figure_path, label, pred, image, self.num_slices, f"{case}: {dice}")
        return row

    def write(self, extra: Optional[dict] = None) -> dict:
        """Write ``metrics.csv`` (one row per case; ``nan`` where a metric is undefined) and ``summary.json``
        (``metrics``: :func:`summarize`, ``num_cases``, ``empty_predictions``, plus ``extra``); return the
        summary dict."""
        if not self.rows:
            raise ValueError("no case was evaluated.")
        os.makedirs(self.output_dir, exist_ok=True)
        columns = list(dict.fromkeys(column for row in self.rows for column in row))
        with open(os.path.join(self.output_dir, "metrics.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="nan")
            writer.writeheader()
            writer.writerows(self.rows)
        summary = {
            "metrics": summarize(self.rows),
            "num_cases": len(self.rows),
            "empty_predictions": self.empty_predictions,
            **(extra or {}),
        }
        with open(os.path.join(self.output_dir, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=4)
        return summary


# --------------------------------------------------------------------------------------------------- folders
class UnpairedCasesError(ValueError):
    """Predictions without a label or labels without a prediction, when the user did not allow a subset."""


def _nifti_by_case(folder: str) -> Dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder.")
    names = sorted(n for n in os.listdir(folder) if n.endswith(NIFTI_SUFFIXES))
    return {case_name(n): os.path.join(folder, n) for n in names}


def pair_files(pred_dir: str, label_dir: str) -> Tuple[List[Tuple[str, str, str]], List[str], List[str]]:
    """Pair the NIfTI files of two folders by name (``.nii`` and ``.nii.gz`` match each other; sub-folders such as
    ``probabilities/`` are ignored).

    Returns:
        ``(pairs, unpaired_predictions, unpaired_labels)`` with ``pairs`` a sorted list of
        ``(case, prediction path, label path)`` and the others lists of case names.
    """
    preds, labels = _nifti_by_case(pred_dir), _nifti_by_case(label_dir)
    pairs = [(case, preds[case], labels[case]) for case in sorted(preds.keys() & labels.keys())]
    return pairs, sorted(preds.keys() - labels.keys()), sorted(labels.keys() - preds.keys())


def _load_label_map(path: str) -> Tuple[np.ndarray, np.ndarray, Tuple[float, ...]]:
    """A label map, its affine and voxel size; raises ``ValueError`` naming the file when it cannot be read or is
    not 3D."""
    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises several exception types for bad files (and EOFError, zlib.error)
        raise ValueError(
            f"{path}: not a readable label map ({type(err).__name__}: {' '.join(str(err).split())})."
        ) from err
    if len(image.shape) != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {image.shape}.")
    return np.rint(array).astype(np.int16), image.affine, tuple(image.header.get_zooms()[:3])


def evaluate_folders(
    pred_dir: str,
    label_dir: str,
    output_dir: str,
    image_dir: Optional[str] = None,
    classes: Optional[Sequence[int]] = None,
    num_slices: int = 3,
    allow_unpaired: bool = False,
) -> dict:
    """Compare the predictions in ``pred_dir`` with the labels of the same name in ``label_dir``.

    Writes ``output_dir/metrics.csv``, ``output_dir/summary.json`` and ``output_dir/figures/<case>.png``. HD95 and
    ASD are in voxels, with ``_mm`` variants from the label header's voxel size. A file present on one side only is
    an error (a summary over another set of cases than the user meant would look like a result), unless
    ``allow_unpaired``: then the paired cases are scored and the others listed in the summary
    (``unpaired_predictions``, ``unpaired_labels``) and logged as warnings. ``output_dir`` (and ``figures/``) must
    not be one of the input folders (:func:`bundle.config.paths.check_outputs_apart`); both checks run before any
    file is read.

    Args:
        pred_dir: folder of predicted label maps (``.nii`` / ``.nii.gz``).
        label_dir: folder of ground-truth label maps with the same file names.
        output_dir: where the report goes.
        image_dir: optional folder of the input images (same names), drawn under the figure contours.
        classes: ``None`` for binary foreground metrics, or the class indices to score separately.
        num_slices: slices per figure; 0 for no figures.
        allow_unpaired: score the paired cases only, when some file has no partner.

    Returns:
        the summary dict also written to ``summary.json``.

    Raises:
        UnpairedCasesError: a file without a partner, and not ``allow_unpaired`` (one line per side, naming the
            folder and the cases).
        PathError: ``output_dir`` is an input folder.
        ValueError: if no file pairs up, or a pair differs in shape or voxel grid (affine).
    """
    pairs, unpaired_preds, unpaired_labels = pair_files(pred_dir, label_dir)
    images = _nifti_by_case(image_dir) if image_dir else {}
    inputs = [path for _, pred, label in pairs for path in (pred, label)] + list(images.values())
    folders = [pred_dir, label_dir] + ([image_dir] if image_dir else [])
    check_outputs_apart(inputs, output_dir, ["figures"], input_folders=folders)
    if not pairs:
        raise ValueError(f"no prediction in {pred_dir} has a label of the same name in {label_dir}.")
    unpaired = [
        f"{folder}: {len(cases)} {kind}: {', '.join(cases)}"
        for folder, kind, cases in (
            (pred_dir, f"prediction(s) without a label in {label_dir}", unpaired_preds),
            (label_dir, f"label(s) without a prediction in {pred_dir}", unpaired_labels),
        )
        if cases
    ]
    if unpaired and not allow_unpaired:
        raise UnpairedCasesError("\n".join(unpaired))
    for line in unpaired:
        logger.warning(line)
    report = MetricsReport(output_dir, classes, num_slices)
    for case, pred_path, label_path in pairs:
        pred, pred_affine, _ = _load_label_map(pred_path)
        label, label_affine, spacing = _load_label_map(label_path)
        if pred.shape != label.shape or not np.allclose(pred_affine, label_affine, atol=1e-3):
            raise ValueError(
                f"{pred_path} and {label_path} are on different voxel grids (shapes {pred.shape} / {label.shape}, "
                f"affines\n{pred_affine}\n{label_affine})."
            )
        image = np.asarray(nib.load(images[case]).dataobj) if case in images else None
        report.add(case, pred, label, spacing, image)
    return report.write({"unpaired_predictions": unpaired_preds, "unpaired_labels": unpaired_labels})


def score_mask_folders(
    pred_dir: Optional[str],
    label_dir: Optional[str],
    output_dir: str,
    image_dir: Optional[str] = None,
    classes: Optional[Sequence[int]] = None,
    num_slices: int = 3,
    allow_unpaired: Any = False,
) -> None:
    """:func:`evaluate_folders` for the command line and ``configs/evaluate.json``'s ``score_masks`` (the command
    line's options are its arguments): prints the summary (``summary.json`` holds it), and raises
    :class:`~bundle.config.errors.BundleError` ("Cannot evaluate: ...", one line per problem) for a missing folder,
    unpaired files (naming both folders and the cases), files on different grids or an output folder that holds inputs.
    ``allow_unpaired`` is a bool or one of its command-line spellings (``"true"``).
    """
    if not pred_dir or not label_dir:
        raise BundleError("Cannot evaluate:", ["give both the masks' folder (pred_dir) and the labels' (label_dir)."])
    try:
        summary = evaluate_folders(
            pred_dir,
            label_dir,
            output_dir,
            image_dir,
            classes,
            num_slices,
            parse_bool(allow_unpaired, "allow_unpaired"),
        )
    except UnpairedCasesError as err:
        title = "Cannot evaluate: some files have no partner (--allow_unpaired true scores the paired cases only):"
        raise BundleError(title, str(err).splitlines()) from None
    except (ValueError, FileNotFoundError) as err:
        raise BundleError("Cannot evaluate:", str(err).splitlines()) from None
    print(f"{summary['num_cases']} cases, {len(summary['empty_predictions'])} empty predictions -> {output_dir}")
    print(format_summary(summary["metrics"]))


# ---------------------------------------------------------------------------------------------- ignite handler
def save_prediction(path: str, pred: np.ndarray) -> None:
    """Write a class map ``(H, W, D)`` as ``pred`` (uint8) of a compressed ``.npz``, atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".partial.npz"
    np.savez_compressed(temporary, pred=pred.astype(np.uint8))
    os.replace(temporary, path)


class MetricsReportHandler:
    """Ignite handler that fills a :class:`MetricsReport` from a MONAI ``SupervisedEvaluator`` and writes it when
    the run completes (``configs/evaluate.json``).

    Expects the decollated ``engine.state.output`` items to hold, after postprocessing, ``pred`` (1, H, W, D) class
    indices on the input file's grid (``Invertd``), ``label`` (1, h, w, d) whose metadata names its file, and
    optionally ``image`` (C, H, W, D). The case name is the label's file name (the case folder for LA's
    ``<case>/mri_norm2.h5``); the spacing is the label header's ``pixdim`` when present (NIfTI), so h5 cases are
    scored in voxels only.

    With ``original_labels`` (default), the ground truth is read again from the label's file, untouched: when the
    preprocessing resamples (the ``cpu`` benchmark protocol zooms by 0.5), inverting the resampled label would
    score against a degraded ground truth, so the prediction is brought back to the original grid and compared with
    the original label instead.

    Args:
        output_dir: where ``metrics.csv``, ``summary.json`` and ``figures/`` go.
        classes: see :class:`MetricsReport`.
        num_slices: see :class:`MetricsReport`.
        original_labels: score against the label file as stored rather than the ``label`` of the output item.
        predictions_dir: also write each case's predicted class map there as ``<case>.npz`` (array ``pred``,
            uint8, the label's grid; written to a temporary name, then renamed), e.g. to compare two precisions.
    """

    def __init__(
        self,
        output_dir: str,
        classes: Optional[Sequence[int]] = None,
        num_slices: int = 3,
        original_labels: bool = True,
        predictions_dir: Optional[str] = None,
    ) -> None:
        self.report = MetricsReport(output_dir, classes, num_slices)
        self.predictions_dir = predictions_dir
        self.load_label = (
            Compose([LoadVolumed(keys=["label"]), EnsureChannelFirstd(keys=["label"])]) if original_labels else None
        )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        for item in engine.state.output:
            label = item["label"]
            meta = getattr(label, "meta", {})
            path = str(meta.get("filename_or_obj", f"case_{len(self.report.rows):04d}"))
            case = (
                os.path.basename(os.path.dirname(path)) if os.path.basename(path) == LA_FILE_NAME else case_name(path)
            )
            if self.load_label is not None:
                label = self.load_label({"label": path})["label"]
                meta = label.meta
            spacing = [float(v) for v in np.asarray(meta["pixdim"])[1:4]] if "pixdim" in meta else None
            image = np.asarray(item["image"][0]) if "image" in item else None
            pred = np.asarray(item["pred"][0])
            if pred.shape != tuple(label.shape[1:]):
                raise ValueError(f"{path}: prediction shape {pred.shape} differs from the label's {label.shape[1:]}.")
            self.report.add(case, pred, np.asarray(label[0]), spacing, image)
            if self.predictions_dir:
                save_prediction(os.path.join(self.predictions_dir, f"{case}.npz"), pred)

    def completed(self, engine: Engine) -> None:
        summary = self.report.write()
        logger.info(
            f"evaluated {summary['num_cases']} cases -> {self.report.output_dir}\n{format_summary(summary['metrics'])}"
        )
