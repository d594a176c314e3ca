"""Which scans to label next: rank scans by the trained model's uncertainty (``configs/rank.json``).

The ranking reuses the inference path of ``configs/inference.json`` unchanged (preprocessing, MONAI's
``SlidingWindowInferer``, ``Invertd`` back to each input's grid, the two subnets' disagreement of
:class:`bundle.inference.folder.SubnetDisagreement`); :class:`FolderRanking` replaces only the writing of masks by the
scoring of each scan, and writes ``ranking.csv`` and ``ranking.png`` at the end.

Scores of one scan, on its own (input) grid, with ``p̄`` the averaged softmax ``(C, *S)`` (the ensemble's output),
``p_A``, ``p_B`` the two subnets' softmaxes and ``r`` = ``band_voxels``:

* predicted foreground ``F = {v : argmax_c p̄_c(v) != 0}``;
* scored region ``R = F ⊕ cube(2r + 1)``: ``F`` plus the boundary band of voxels within Chebyshev distance ``r``
  (voxels of the input grid) of it, i.e. MONAI's ``dilate`` with a ``(2r + 1)³`` cube; when ``F`` is empty, ``R`` is
  the whole volume (and ``foreground_voxels`` is 0);
* ``disagreement = (1 / |R|) Σ_{v ∈ R} ½ Σ_c |p_A,c(v) − p_B,c(v)|`` in ``[0, 1]`` (the total-variation distance of
  the two subnets, averaged over ``R``); undefined (``n/a``) for a single-network model;
* ``entropy = (1 / |R|) Σ_{v ∈ R} −Σ_c p̄_c(v) log p̄_c(v)`` in ``[0, log C]`` nats (of the averaged softmax; for a
  single-network model, of its one softmax).

Scores are means over ``R`` rather than over the volume, so that a large field of view of confident background
does not dilute them. Rank 1 is the most uncertain scan (the one to label first); ties are broken by scan name.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
import torch
from matplotlib.figure import Figure
from monai.transforms import Compose, EnsureChannelFirstd
from monai.transforms.utils_morphological_ops import dilate

from bundle.data.checks import stop
from bundle.data.datalists import LA_FILE_NAME, DatasetError, read_case_list
from bundle.data.transforms import LoadVolumed
from bundle.inference.folder import FolderInference, SubnetDisagreement, entropy_map, image_datalist

logger = logging.getLogger(__name__)

SCORES = ("disagreement", "entropy")
#: columns of ``ranking.csv``, in order.
CSV_COLUMNS = ("rank", "scan", "disagreement", "entropy", "ranked_by", "foreground_voxels", "foreground_ml", "path")
#: the cell of a value that cannot be defined (disagreement of a single network, volume of a file without spacing);
#: pandas reads it as NaN.
NOT_AVAILABLE = "n/a"
CSV_NAME = "ranking.csv"
FIGURE_NAME = "ranking.png"


# ------------------------------------------------------------------------------------------------- inputs
def scan_datalist(dataset_dir: str, case_list: Optional[str] = None, in_channels: int = 1) -> List[Dict[str, Any]]:
    """The scans to rank, ``[{"image": path, "scan": name}, ...]``.

    Without ``case_list``: every NIfTI file of the folder (or glob) ``dataset_dir``
    (:func:`bundle.inference.folder.image_datalist`, nnU-Net channel files grouped by case), named by its case. With
    ``case_list`` (the LA layout): one item per line of the list file, ``<dataset_dir>/<case>/mri_norm2.h5``, named
    by the case; a relative ``case_list`` is looked up in ``dataset_dir`` first, then in the working folder. A listed
    case whose file is missing is kept, so that the runner reports and skips it like any broken scan.

    Raises:
        DatasetError: no input, or a case listed twice.
    """
    if case_list is None:
        return [{**item, "scan": item["case"]} for item in image_datalist(dataset_dir, in_channels)]
    in_dataset = os.path.join(dataset_dir, case_list)
    list_path = in_dataset if os.path.isfile(in_dataset) or not os.path.isfile(case_list) else case_list
    cases = read_case_list(list_path)
    if not cases:
        raise DatasetError(f"{list_path}: the case list is empty.")
    repeated = sorted({case for case in cases if cases.count(case) > 1})
    if repeated:
        raise DatasetError(f"{list_path}: cases listed more than once: {repeated}.")
    return [{"image": os.path.join(dataset_dir, case, LA_FILE_NAME), "scan": case} for case in cases]


def scan_datalist_or_exit(
    dataset_dir: str, case_list: Optional[str] = None, in_channels: int = 1
) -> List[Dict[str, Any]]:
    """:func:`scan_datalist` for ``configs/rank.json``: stops with its one-line report (no images, no such folder,
    an empty list, a case listed twice) instead of a traceback ending in "Failed to instantiate component"."""
    try:
        return scan_datalist(dataset_dir, case_list, in_channels)
    except DatasetError as err:
        stop("Cannot rank:", str(err).splitlines())


def voxel_volume_ml(path: str) -> Optional[float]:
    """Volume of one voxel in mL from a NIfTI header's voxel size and spatial unit (``unknown`` is taken as mm, as
    most tools do); ``None`` for files without a voxel size (LA ``.h5``)."""
    if path.endswith(".h5"):
        return None
    header = nib.load(path).header
    unit = header.get_xyzt_units()[0]
    to_mm = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}.get(unit, 1.0)
    return float(np.prod([float(z) * to_mm for z in header.get_zooms()[:3]])) / 1000.0


# ------------------------------------------------------------------------------------------------ scores
def scoring_region(prob: torch.Tensor, band_voxels: int) -> torch.Tensor:
    """The region ``R`` of the module docstring: predicted foreground dilated by ``band_voxels`` (cube), or every
    voxel when nothing is predicted. ``prob`` ``(C, *S)`` -> boolean ``(*S)``."""
    foreground = prob.argmax(dim=0) != 0
    if not foreground.any():
        return torch.ones_like(foreground)
    if band_voxels == 0:
        return foreground
    return dilate(foreground[None, None].float(), filter_size=2 * band_voxels + 1)[0, 0] > 0.5


def score_scan(prob: torch.Tensor, disagreement: Optional[torch.Tensor], band_voxels: int) -> Dict[str, float]:
    """Per-scan scores (module docstring) from one scan's maps on one grid.

    Args:
        prob: averaged softmax ``p̄``, ``(C, *S)``, summing to 1 over ``C``.
        disagreement: ``½ Σ_c |p_A,c − p_B,c|`` per voxel, ``(1, *S)``, or ``None`` for a single network.
        band_voxels: ``r``, the width of the boundary band in voxels (``>= 0``).

    Returns:
        ``disagreement`` (``nan`` when ``disagreement`` is ``None``), ``entropy`` (nats), ``foreground_voxels``
        (``|F|``) and ``region_voxels`` (``|R|``).

    Raises:
        ValueError: when a map is not finite inside ``R`` (e.g. a NaN input).
    """
    if band_voxels < 0:
        raise ValueError(f"band_voxels must be >= 0, got {band_voxels}.")
    prob = torch.as_tensor(prob, dtype=torch.float32)
    region = scoring_region(prob, band_voxels)
    scores = {"entropy": float(entropy_map(prob, dim=0)[0][region].mean(dtype=torch.float64))}
    scores["disagreement"] = math.nan
    if disagreement is not None:
        values = torch.as_tensor(disagreement, dtype=torch.float32)[0][region]
        scores["disagreement"] = float(values.mean(dtype=torch.float64))
    checked = ["entropy"] + (["disagreement"] if disagreement is not None else [])
    if not all(math.isfinite(scores[k]) for k in checked):
        raise ValueError(f"the model's maps are not finite (scores {scores}); is the input finite?")
    scores["foreground_voxels"] = int((prob.argmax(dim=0) != 0).sum())
    scores["region_voxels"] = int(region.sum())
    return scores


def rank_rows(rows: Sequence[Dict], rank_by: str) -> List[Dict]:
    """``rows`` (each with ``scan`` and the score ``rank_by``) sorted by decreasing score, ties by scan name, each
    with its ``rank`` (1 = most uncertain) and ``ranked_by``."""
    if rank_by not in SCORES:
        raise ValueError(f"rank_by must be one of {SCORES}, got '{rank_by}'.")
    ordered = sorted(rows, key=lambda row: (-row[rank_by], row["scan"]))
    return [{**row, "rank": rank, "ranked_by": rank_by} for rank, row in enumerate(ordered, start=1)]


# -------------------------------------------------------------------------------------------------- outputs
def write_ranking_csv(rows: Sequence[Dict], path: str) -> str:
    """Write ranked rows (:func:`rank_rows`) as :data:`CSV_COLUMNS` to ``path`` atomically (temporary file in the
    same folder, then ``os.replace``). Undefined values are written as ``n/a``."""

    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return NOT_AVAILABLE
        return f"{value:.6g}" if isinstance(value, float) else value

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _partial_name(path)
    try:
        with open(tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: cell(row.get(k)) for k in CSV_COLUMNS} for row in rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _partial_name(path: str) -> str:
    """The hidden temporary name an output is written under before ``os.replace`` gives it its final name."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")


def middle_slice(mask: np.ndarray) -> int:
    """Index along the last axis half-way through the slices holding ``mask`` (``(*S)`` boolean), else the
    volume's middle."""
    holding = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
    return int((holding[0] + holding[-1]) // 2) if holding.size else mask.shape[-1] // 2


def save_ranking_figure(previews: Sequence[Dict], path: str) -> str:
    """PNG of the top scans' middle slices: the image in grey, the ranked uncertainty map as a heat overlay (its
    colour bar per scan) and the predicted foreground's contour in cyan; written atomically.

    Args:
        previews: one dict per scan, in rank order: ``title``, ``image`` ``(H, W)``, ``uncertainty`` ``(H, W)``,
            ``mask`` ``(H, W)`` boolean, ``label`` (the colour bar's name).
        path: output ``.png`` path.
    """
    figure = Figure(figsize=(3.6 * max(len(previews), 1), 3.9))
    for column, preview in enumerate(previews, start=1):
        axis = figure.add_subplot(1, len(previews), column)
        axis.imshow(preview["image"].T, cmap="gray", origin="lower")
        heat = np.ma.masked_less_equal(preview["uncertainty"].T, 0.0)
        shown = axis.imshow(heat, cmap="inferno", origin="lower", alpha=0.6, vmin=0.0)
        mask = preview["mask"]
        if mask.any() and not mask.all():
            axis.contour(mask.T.astype(np.uint8), levels=[0.5], colors="cyan", linewidths=0.8)
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02, label=preview["label"])
        axis.set_title(preview["title"], fontsize=8)
        axis.axis("off")
    figure.suptitle("Label next: middle slices of the top-ranked scans (cyan: predicted foreground)", fontsize=9)
    tmp = _partial_name(path)
    try:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# -------------------------------------------------------------------------------------------------- runner
class FolderRanking(FolderInference):
    """Scores every scan and writes ``output_dir/ranking.csv`` (:data:`CSV_COLUMNS`) and ``output_dir/ranking.png``;
    the ``evaluator`` of ``configs/rank.json``. No masks are written.

    It is :class:`bundle.inference.folder.FolderInference` (same checks, preprocessing, sliding window, inversion to the
    input grid, and the same handling of bad scans: each is logged and skipped, the others are ranked, and the
    command ends with exit status 1 listing them) with the writing step replaced by :func:`score_scan`. The
    postprocessing must keep the probabilities as ``prob`` (``save_probabilities: true``), and the disagreement is
    scored when the runner predicts it (``save_uncertainty``: ``rank.json`` sets it for models with two subnets).

    Args:
        band_voxels: ``r`` of :func:`score_scan` (voxels of the input grid).
        rank_by: ``disagreement``, ``entropy``, or ``auto``: ``disagreement`` for a two-subnet model, else
            ``entropy``.
        figure_scans: how many top-ranked scans the figure shows (0: no figure).
        **kwargs: the arguments of :class:`bundle.inference.folder.FolderInference`.
    """

    def __init__(self, band_voxels: int = 3, rank_by: str = "auto", figure_scans: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        two_subnets = isinstance(self.predictor.network, SubnetDisagreement)  # inside the autocast wrapper
        if rank_by == "auto":
            rank_by = "disagreement" if two_subnets else "entropy"
        if rank_by not in SCORES:
            raise ValueError(f"rank_by must be 'auto' or one of {SCORES}, got '{rank_by}'.")
        if rank_by == "disagreement" and not two_subnets:
            raise ValueError(
                "rank_by 'disagreement' needs a model with two subnets (net_a, net_b) and save_uncertainty true; "
                "rank a single-network model by 'entropy'."
            )
        if band_voxels < 0:
            raise ValueError(f"band_voxels must be >= 0, got {band_voxels}.")
        self.band_voxels = band_voxels
        self.rank_by = rank_by
        self.figure_scans = figure_scans
        self.rows: List[Dict] = []
        self.previews: Dict[str, Dict] = {}

    def run(self) -> Dict[str, list]:
        """Score all scans, then write the ranking of those that succeeded (also when some failed). Returns
        ``{"written": [scan names], "failed": [...], "ranking": [ranked rows]}``; raises
        :class:`~bundle.config.errors.BundleError` like :meth:`FolderInference.run` when a scan failed, after writing
        the ranking."""
        self.rows, self.previews, self.ranking = [], {}, []
        result = super().run()
        return {**result, "ranking": self.ranking}

    def _output_subfolders(self) -> List[str]:
        return []

    def _files(self, outputs: List[str]) -> List[str]:
        return []  # scan names: the files are written at the end

    def _finish_outputs(self) -> List[str]:
        """Rank the scored scans and write ``ranking.csv`` and ``ranking.png``; return their paths."""
        self.ranking = self._write_outputs()
        names = [CSV_NAME] + ([FIGURE_NAME] if self.figure_scans > 0 and self.ranking else [])
        return [os.path.join(self.output_dir, name) for name in names]

    def _save(self, data: dict) -> List[str]:
        """Score one postprocessed item (maps on the input grid) instead of writing it; keep its preview."""
        if "prob" not in data:
            raise ValueError("ranking needs the probabilities: set save_probabilities true (configs/rank.json does).")
        path = str(data["image"].meta["filename_or_obj"])
        prob = torch.as_tensor(data["prob"])
        disagreement = data.get("disagreement")
        scores = score_scan(prob, None if disagreement is None else torch.as_tensor(disagreement), self.band_voxels)
        voxel_ml = voxel_volume_ml(path)
        volume_ml = None if voxel_ml is None else scores["foreground_voxels"] * voxel_ml
        row = {"scan": data["scan"], **scores, "foreground_ml": volume_ml, "path": path}
        self.rows.append(row)
        mask = prob.argmax(dim=0).numpy() != 0
        shown = entropy_map(prob, dim=0)[0] if self.rank_by == "entropy" else torch.as_tensor(disagreement)[0]
        z = middle_slice(mask)
        self.previews[row["scan"]] = {"path": path, "slice": z, "mask": mask[..., z], "uncertainty": shown[..., z]}
        logger.info(f"{row['scan']}: " + ", ".join(f"{k} {scores[k]:.4g}" for k in SCORES))
        return [row["scan"]]

    def _write_outputs(self) -> List[Dict]:
        ranked = rank_rows(self.rows, self.rank_by)
        csv_path = write_ranking_csv(ranked, os.path.join(self.output_dir, CSV_NAME))
        if self.figure_scans > 0 and ranked:
            previews = [self._preview(row) for row in ranked[: self.figure_scans]]
            save_ranking_figure(previews, os.path.join(self.output_dir, FIGURE_NAME))
        logger.info(f"{len(ranked)} scans ranked by {self.rank_by} into {csv_path}")
        return ranked

    def _preview(self, row: Dict) -> Dict:
        """The figure panel of one ranked scan: its image slice is read again from the file (input grid)."""
        stored = self.previews[row["scan"]]
        image = Compose([LoadVolumed(keys=["image"]), EnsureChannelFirstd(keys=["image"])])({"image": stored["path"]})
        return {
            "title": f"#{row['rank']} {row['scan']}\n{self.rank_by} {row[self.rank_by]:.4g}, slice {stored['slice']}",
            "image": np.asarray(image["image"][0][..., stored["slice"]]),
            "uncertainty": np.asarray(stored["uncertainty"]),
            "mask": stored["mask"],
            "label": f"{self.rank_by}" + (" (nats)" if self.rank_by == "entropy" else ""),
        }
