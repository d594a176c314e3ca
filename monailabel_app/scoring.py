"""The scoring method: each unlabeled image's uncertainty under the current ``model.pt``, by ``configs/rank.json``.

The scores are those of ``bundle/inference/ranking.py`` (:class:`bundle.inference.ranking.FolderRanking`, run through
``configs/inference.json`` + ``configs/rank.json`` exactly as on the command line): the mean disagreement of the two
subnets over the predicted foreground and its boundary band, or, for a single-network method, the mean entropy
(``rank_by: auto``). Each image's scores are stored in the datastore's image info with the ``model.pt`` timestamp
they belong to, so that an image is scored once per trained model; an image that cannot be scored is reported
(log line and ``ssl_score_error`` in its info) and skipped.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Tuple

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from bundle.data.image_formats import NIFTI_SUFFIXES
from monailabel_app.infer import reason
from monailabel_app.settings import AppSettings

logger = logging.getLogger(__name__)

#: image-info keys written by the scoring method.
SCORE, RANKED_BY, TIMESTAMP, ERROR = "ssl_score", "ssl_ranked_by", "ssl_score_ts", "ssl_score_error"
DISAGREEMENT, ENTROPY = "ssl_disagreement", "ssl_entropy"


def rank_images(settings: AppSettings, images: Mapping[str, str], output_dir: str) -> Tuple[Dict, Dict]:
    """Score ``images`` (id -> path) with ``configs/rank.json``.

    Returns ``(rows, failures)``: ``rows`` id -> the scan's ranking row (``disagreement``, ``entropy``, and
    ``ranked_by``: the score ``rank_by: auto`` chose), ``failures`` id -> one line saying why it was not scored
    (unreadable, non-finite voxels, not NIfTI).
    """
    failures = {
        i: f"{p}: not a NIfTI file (.nii / .nii.gz)" for i, p in images.items() if not p.endswith(NIFTI_SUFFIXES)
    }
    nifti = {i: p for i, p in images.items() if i not in failures}
    if not nifti:
        return {}, failures
    os.makedirs(output_dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=".scans-", dir=output_dir)  # the scans to rank, as links to the datastore
    try:
        links = {}
        for image_id, path in nifti.items():
            link = os.path.join(folder, os.path.basename(path))
            os.symlink(path, link)
            links[link] = image_id
        parser = settings.inference_parser(
            extra=["rank.json"], dataset_dir=folder, output_dir=output_dir, rank_figure_scans=0
        )
        ranking = parser.get_parsed_content("evaluator")
        try:
            ranking.run()
            report = ""
        except (Exception, SystemExit) as err:  # the scans that failed are listed after the others are ranked
            report = str(err)
        rows = {links[row["path"]]: {**row, "ranked_by": ranking.rank_by} for row in ranking.rows}
        for link, image_id in links.items():
            if image_id not in rows:
                lines = [line.strip() for line in report.splitlines() if link in line]
                why = lines[0] if lines else f"{link}: not scored ({' '.join(report.split())[:300] or 'no result'})"
                failures[image_id] = why.replace(link, nifti[image_id])
        return rows, failures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def image_scores(row: Mapping[str, Any], timestamp: float) -> Dict[str, Any]:
    """The image-info entries of one ranking row (``None`` for an undefined disagreement)."""

    def value(v: float):
        return None if v is None or math.isnan(v) else float(v)

    return {
        SCORE: value(row[row["ranked_by"]]),
        RANKED_BY: row["ranked_by"],
        DISAGREEMENT: value(row["disagreement"]),
        ENTROPY: value(row["entropy"]),
        TIMESTAMP: timestamp,
        ERROR: None,
    }


class DisagreementScoring(ScoringMethod):
    """Scores the datastore's unlabeled images not yet scored under the current ``model.pt`` (all of them with the
    request's ``"force": true``). Returns a summary: ``scored``, ``skipped`` (id -> reason), ``total``."""

    def __init__(self, settings: AppSettings) -> None:
        super().__init__(
            "Disagreement of the two subnets (entropy for a single-network method) on each unlabeled image, "
            "by configs/rank.json"
        )
        self.settings = settings

    def __call__(self, request: Dict, datastore: Datastore) -> Dict[str, Any]:
        timestamp = self.settings.model_timestamp()
        unlabeled = sorted(datastore.get_unlabeled_images())
        if timestamp is None:
            logger.info(f"Scoring: no trained model at {self.settings.model_path} yet; nothing scored.")
            return {"scored": 0, "skipped": {}, "total": len(unlabeled), "model": None}
        force = bool(request.get("force", False))
        todo = {
            i: datastore.get_image_uri(i)
            for i in unlabeled
            if force or datastore.get_image_info(i).get(TIMESTAMP) != timestamp
        }
        rows, failures = {}, {}
        if todo:
            try:
                rows, failures = rank_images(self.settings, todo, os.path.join(self.settings.work_dir, "scoring"))
            except (Exception, SystemExit) as err:  # e.g. weights that do not fit: reported, the server stays up
                failures = {i: f"{self.settings.model_path}: {reason(err)}" for i in todo}
        for image_id, row in rows.items():
            datastore.update_image_info(image_id, image_scores(row, timestamp))
        for image_id, line in failures.items():
            logger.error(f"Scoring: skipped {image_id}: {line}")
            datastore.update_image_info(image_id, {SCORE: None, TIMESTAMP: timestamp, ERROR: line})
        summary = {"scored": len(rows), "skipped": failures, "total": len(unlabeled), "model": self.settings.model_path}
        logger.info(f"Scoring: {summary}")
        return summary


def current_scores(datastore: Datastore, images: List[str], timestamp: float) -> Tuple[Dict, Dict]:
    """``(scores, errors)`` of ``images`` under the model of ``timestamp``: id -> info for the scored ones, id ->
    reason for those that could not be scored; images not scored under this model are in neither."""
    scores, errors = {}, {}
    for image_id in images:
        info = datastore.get_image_info(image_id)
        if info.get(TIMESTAMP) != timestamp:
            continue
        if info.get(SCORE) is not None:
            scores[image_id] = info
        elif info.get(ERROR):
            errors[image_id] = info[ERROR]
    return scores, errors
