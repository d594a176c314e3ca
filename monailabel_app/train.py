"""The train task: the bundle's semi-supervised training on the datastore's labeled *and* unlabeled images.

The datastore's images with a final label are the labeled data, every other image of the datastore is unlabeled
data (nothing synthetic: the bundle's embedded dataset is never generated). Each file is checked first (header,
every voxel finite, label values in range, label affine = image affine, as the bundle's own data check); a broken
file is reported and left out, and training goes on with the others. The run is ``configs/train.json`` (+ the
method's overlay) with the datastore's lists, writing ``model_dir/model.pt`` at the end, which the infer task then
reloads.

Length: the request's ``max_iterations`` when it is positive, else ``max_epochs`` passes over the labeled data
(``max_epochs * ceil(labeled / batch)`` iterations; the bundle's trainer counts one pass of the labeled loader as
one epoch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Sequence, Tuple

from monai.bundle import ConfigWorkflow
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from bundle.data.checks import problem_lines
from bundle.data.datalists import check_items
from bundle.data.transforms import LoadVolumed, check_volume_transforms
from monailabel_app.infer import reason
from monailabel_app.settings import CONFIGS, AppSettings

logger = logging.getLogger(__name__)

BATCH_SIZE = 2
DEFAULT_EPOCHS = 50
STATS_NAME = "train_stats.json"


def write_json(data: Any, path: str) -> str:
    """Write ``data`` as JSON to ``path`` atomically (temporary name in the same folder, then ``os.replace``)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
    with open(tmp, "w") as stream:
        json.dump(data, stream, indent=4)
    os.replace(tmp, path)
    return path


def datastore_items(datastore: Datastore) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """``(labeled, unlabeled)`` items of the datastore: ``{"image", "label"}`` for each image with a final label,
    ``{"image"}`` for every other image (by id)."""
    labeled = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist()]
    unlabeled = [{"image": datastore.get_image_uri(i)} for i in sorted(datastore.get_unlabeled_images())]
    return labeled, unlabeled


def usable_items(items: Sequence[Dict[str, str]], num_classes: int) -> Tuple[List[Dict[str, str]], List[str]]:
    """Split ``items`` into those that pass the bundle's data checks and the report lines of those that do not.

    Per item: the header check of :func:`bundle.data.datalists.check_items`, then a full read through the checks
    training applies (:func:`bundle.data.transforms.check_volume_transforms`: finite voxels, labels in
    ``[0, num_classes)``, label affine equal to the image's), so that one broken file is left out instead of stopping
    the training.
    """
    usable, problems = [], []
    for item in items:
        keys = [k for k in ("image", "label") if k in item]
        try:
            check_items([item])
            data: Any = dict(item)
            for transform in [LoadVolumed(keys)] + check_volume_transforms(keys, num_classes=num_classes):
                data = transform(data)
        except Exception as err:  # every kind of unreadable or invalid file is reported, not raised
            problems += problem_lines(item, err)
            continue
        usable.append(dict(item))
    return usable, problems


def training_length(request: Dict[str, Any], num_labeled: int, batch_size: int = BATCH_SIZE) -> int:
    """Iterations of a training: ``max_iterations`` when positive, else ``max_epochs`` passes over the labeled data."""
    iterations = int(request.get("max_iterations") or 0)
    if iterations > 0:
        return iterations
    epochs = int(request.get("max_epochs") or DEFAULT_EPOCHS)
    if epochs <= 0:
        raise ValueError(f"max_epochs must be positive, got {epochs}.")
    return epochs * math.ceil(num_labeled / min(batch_size, num_labeled))


def training_workflow(
    settings: AppSettings, labeled: Sequence[Dict], unlabeled: Sequence[Dict], run_dir: str, iterations: int
) -> ConfigWorkflow:
    """The bundle's training workflow (not yet initialized) on ``labeled`` + ``unlabeled``.

    The items are written as an MSD-style ``run_dir/data/dataset.json`` (items without a label are unlabeled), the
    bundle's ``dataset_dir``; the run's logs and checkpoints go to ``run_dir``, the weights to ``model_dir``.
    """
    data_dir = os.path.join(run_dir, "data")
    write_json({"training": list(labeled) + list(unlabeled)}, os.path.join(data_dir, "dataset.json"))
    overrides = {
        **settings.shared_overrides(),
        "dataset_dir": data_dir,
        "output_dir": run_dir,
        "model_dir": settings.model_dir,
        "num_labeled": -1,
        "max_iterations": iterations,
        "val_interval": iterations,
        "train#log_interval": max(1, min(10, iterations // 10)),
        "train#dataloader#batch_size": min(BATCH_SIZE, len(labeled)),
        "train#unlabeled_dataloader#batch_size": max(1, min(BATCH_SIZE, len(unlabeled))),
    }
    return ConfigWorkflow(
        config_file=settings.training_configs(),
        meta_file=os.path.join(CONFIGS, "metadata.json"),
        logging_file=False,
        workflow_type=None,
        run_id="training",
        **overrides,
    )


class SSLTrainTask(TrainTask):
    """Trains the app's method on the datastore (module docstring); ``/train/<model>`` runs it in a subprocess.

    Returns (and stores for ``/info``'s ``train_stats``): iterations, labeled / unlabeled counts, the files left out
    with their problems, seconds, and the model written. A training that cannot run (too few usable files, a bad
    setting) raises ``RuntimeError`` with the bundle's one-line-per-problem report; ``model.pt`` is then unchanged.
    """

    def __init__(self, settings: AppSettings) -> None:
        super().__init__(
            f"Semi-supervised training ({settings.method} method) on the datastore's labeled and unlabeled images"
        )
        self.settings = settings

    def config(self) -> Dict[str, Any]:
        return {"max_epochs": DEFAULT_EPOCHS, "max_iterations": 0}

    def stats(self) -> Dict[str, Any]:
        path = os.path.join(self.settings.work_dir, STATS_NAME)
        if not os.path.isfile(path):
            return {}
        with open(path) as stream:
            return json.load(stream)

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        start = time.time()
        labeled, unlabeled = datastore_items(datastore)
        labeled, problems = usable_items(labeled, len(self.settings.labels))
        unlabeled, unlabeled_problems = usable_items(unlabeled, len(self.settings.labels))
        problems += unlabeled_problems
        for line in problems:
            logger.error(f"Training: left out {line}")
        if not labeled:
            raise RuntimeError("Cannot train: no usable labeled image in the datastore (label some images first).")
        iterations = training_length(request, len(labeled))
        run_dir = os.path.join(self.settings.work_dir, "train")
        logger.info(f"Training: {len(labeled)} labeled + {len(unlabeled)} unlabeled images, {iterations} iterations")
        try:
            workflow = training_workflow(self.settings, labeled, unlabeled, run_dir, iterations)
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except (Exception, SystemExit) as err:  # the bundle's checks stop with a report: pass it on, model unchanged
            report = str(err) if isinstance(err, SystemExit) else reason(err)
            raise RuntimeError(f"Training failed; {self.settings.model_path} unchanged:\n{report}") from err
        stats = {
            "iterations": iterations,
            "labeled": len(labeled),
            "unlabeled": len(unlabeled),
            "left_out": problems,
            "seconds": round(time.time() - start, 1),
            "model": self.settings.model_path,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_json(stats, os.path.join(self.settings.work_dir, STATS_NAME))
        logger.info(f"Training finished: {stats}")
        return stats
