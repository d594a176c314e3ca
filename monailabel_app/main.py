"""MONAI Label app of this bundle: ``monailabel start_server --app monailabel_app --studies /path/to/scans``.

One model, ``ssl_segmentation``, with four tasks: infer (:mod:`monailabel_app.infer`), train on the datastore's
labeled and unlabeled images (:mod:`monailabel_app.train`), the scoring method ``ssl_disagreement``
(:mod:`monailabel_app.scoring`) and the active-learning strategy ``ssl_disagreement``
(:mod:`monailabel_app.strategy`, MONAI Label's "Next Sample"). Settings: :mod:`monailabel_app.settings`.
"""

import logging
import os
import sys
from typing import Dict

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BUNDLE_ROOT not in sys.path:  # MONAI Label loads this file by path: make the bundle and this package importable
    sys.path.insert(0, BUNDLE_ROOT)

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402

from monailabel_app.infer import SSLInferTask  # noqa: E402
from monailabel_app.scoring import DisagreementScoring  # noqa: E402
from monailabel_app.settings import AppSettings  # noqa: E402
from monailabel_app.strategy import HighestDisagreement  # noqa: E402
from monailabel_app.train import SSLTrainTask  # noqa: E402

logger = logging.getLogger(__name__)

MODEL = "ssl_segmentation"
SCORING = STRATEGY = "ssl_disagreement"


class SemiSupervisedApp(MONAILabelApp):
    """The bundle's segmentation model, trained semi-supervised on the datastore, with disagreement-based sampling."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.settings = AppSettings.from_conf(conf or {})
        logger.info(f"Semi-supervised app settings: {self.settings}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Semi-supervised 3D segmentation",
            description="Trains on labeled and unlabeled scans; Next Sample serves the scan the two subnets disagree "
            "on most",
            version="1.0",
            labels=self.settings.segment_labels,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {MODEL: SSLInferTask(self.settings)}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {MODEL: SSLTrainTask(self.settings)}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {SCORING: DisagreementScoring(self.settings)}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {STRATEGY: HighestDisagreement(DisagreementScoring(self.settings))}
