"""The active-learning strategy: serve the unlabeled image the current model is least sure of.

"Next Sample" in a MONAI Label client asks ``/activelearning/<strategy>``; the answer is the unlabeled image with
the highest score of :mod:`monailabel_app.scoring` (subnet disagreement, or entropy for a single-network method),
ties broken by image id. Images not yet scored under the current ``model.pt`` are scored first (only those), so the
answer never rests on an older model's scores. Before the first training there is no model to ask: the first
unlabeled image (by id) is served, with the reason. Images that cannot be scored are skipped and listed.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from monailabel_app.scoring import DISAGREEMENT, ENTROPY, RANKED_BY, SCORE, DisagreementScoring, current_scores

logger = logging.getLogger(__name__)


class HighestDisagreement(Strategy):
    """Serves the unlabeled image with the highest :mod:`~monailabel_app.scoring` score under the current model."""

    def __init__(self, scoring: DisagreementScoring) -> None:
        super().__init__("Unlabeled image with the highest disagreement of the two subnets (entropy: one network)")
        self.scoring = scoring

    def __call__(self, request: Dict, datastore: Datastore) -> Optional[Dict[str, Any]]:
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        timestamp = self.scoring.settings.model_timestamp()
        if timestamp is None:
            reason = f"no trained model at {self.scoring.settings.model_path} yet: first unlabeled image served"
            logger.info(f"{request.get('strategy')}: {reason}")
            return {"id": images[0], "reason": reason}
        scores, errors = current_scores(datastore, images, timestamp)
        if len(scores) + len(errors) < len(images):
            self.scoring({}, datastore)  # only the images not scored under this model
            scores, errors = current_scores(datastore, images, timestamp)
        if not scores:
            logger.error(f"{request.get('strategy')}: no unlabeled image could be scored: {errors}")
            return None
        best = min(scores, key=lambda image_id: (-scores[image_id][SCORE], image_id))
        info = scores[best]
        logger.info(f"{request.get('strategy')}: {best} ({info[RANKED_BY]} {info[SCORE]:.4g}); skipped {errors}")
        return {
            "id": best,
            "score": info[SCORE],
            "ranked_by": info[RANKED_BY],
            "disagreement": info[DISAGREEMENT],
            "entropy": info[ENTROPY],
            "skipped": errors,
        }
