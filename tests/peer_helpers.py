"""Shared helpers of the peer-method tests (DuCiSC, DyCON): tiny datasets and bundle workflows."""

import os
from pathlib import Path
from typing import Dict, List, Optional

import h5py
import nibabel as nib
import numpy as np
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from bundle.data.synthetic import ensure_synthetic_dataset
from tests.conftest import REPO_ROOT
from tests.training_helpers import make_workflow, tiny_overrides

__all__ = [
    "bundle_overrides",
    "make_workflow",
    "record_iterations",
    "run_workflow",
    "tiny_nifti_dataset",
    "train_tiny_overlay",
]


def tiny_nifti_dataset(root: Path) -> Path:
    """4 labeled + 4 unlabeled + 1 validation NIfTI volumes of 20x20x18 (the synthetic generator)."""
    return Path(
        ensure_synthetic_dataset(
            str(root / "tiny"), num_labeled=4, num_unlabeled=4, num_validation=1, shape=(20, 20, 18)
        )
    )


def poisoned_la_dataset(root: Path, poison: Optional[str], num_cases: int = 4, num_labeled: int = 2) -> Path:
    """An LA-layout dataset (``<case>/mri_norm2.h5`` + ``train.list``) of 20x20x18 volumes with a bright ball.

    Cases from ``num_labeled`` on are used without labels. ``poison="unlabeled"`` inverts the stored labels of those
    cases, ``"labeled"`` those of the labeled cases, ``None`` none; the images are identical in every case.
    """
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (20, 20, 18)], indexing="ij"))
    cases = [f"case{i}" for i in range(num_cases)]
    for i, case in enumerate(cases):
        centre = np.array([10, 10, 9]) + rng.integers(-3, 4, size=3)
        label = (np.linalg.norm(grid - centre[:, None, None, None], axis=0) < 5).astype(np.uint8)
        image = (2.0 * label + rng.standard_normal(label.shape)).astype(np.float32)
        if poison == ("unlabeled" if i >= num_labeled else "labeled"):
            label = 1 - label
        (root / case).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / case / "mri_norm2.h5", "w") as handle:
            handle["image"] = image
            handle["label"] = label
    (root / "train.list").write_text("\n".join(cases) + "\n")
    return root


def bundle_overrides(dataset_dir, out_dir: Path, **extra) -> Dict:
    """The tiny-run overrides of ``tests/engine/test_training.py`` (16^3 patches, base width 4, 3 iterations)."""
    return tiny_overrides(str(dataset_dir), out_dir, **extra)


def record_iterations(workflow: ConfigWorkflow) -> List[Dict[str, float]]:
    """After ``initialize()``: a list that receives every iteration's ``loss`` / ``loss_<name>`` values."""
    history: List[Dict[str, float]] = []
    trainer = workflow.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        history.append({k: float(v) for k, v in engine.state.output.items() if k.startswith("loss")})

    return history


def run_workflow(workflow: ConfigWorkflow) -> ConfigWorkflow:
    """``initialize`` (unless done), ``run`` and ``finalize``."""
    if not workflow.parser.ref_resolver.resolved_content:
        workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def train_tiny_overlay(tmp_path_factory, method: str, overrides: Dict) -> Dict:
    """One 3-iteration bundle run of ``configs/methods/<method>.json`` on :func:`tiny_nifti_dataset` with
    ``overrides``: ``{"data", "out", "workflow", "history"}`` (``history``: :func:`record_iterations`)."""
    data = tiny_nifti_dataset(tmp_path_factory.mktemp(f"{method}_data"))
    out = tmp_path_factory.mktemp(f"{method}_run")
    workflow = make_workflow(["train.json", f"methods/{method}.json"], bundle_overrides(data, out, **overrides))
    workflow.initialize()
    history = record_iterations(workflow)
    run_workflow(workflow)
    return {"data": data, "out": out, "workflow": workflow, "history": history}


def segment_with_inference(trained: Dict, out_dir: Path, **overrides) -> np.ndarray:
    """Run ``inference.json`` alone (the model's ``model_metadata.json`` rebuilds its network) on the trained
    fixture's images with its ``model.pt``; assert every output is a NIfTI mask of 0/1 and return the first one."""
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        dataset_dir=str(trained["data"] / "imagesTr"),
        output_dir=str(out_dir),
        ckpt_path=str(trained["out"] / "models" / "model.pt"),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    outputs = sorted(name for name in os.listdir(out_dir) if name != "manifest.json")
    assert outputs and all(name.endswith(".nii.gz") for name in outputs)
    mask = np.asarray(nib.load(str(out_dir / outputs[0])).dataobj)
    assert mask.ndim == 3 and set(np.unique(mask)) <= {0, 1}
    return mask


def poisoned_histories(method: str, tmp_path: Path, overrides: Dict) -> List:
    """Two iterations of ``configs/methods/<method>.json`` on :func:`poisoned_la_dataset` with no poison, poisoned
    unlabeled labels and poisoned labeled labels; asserts that no unlabeled item or batch carries a label, that the
    first two runs' losses are bit-identical and that the third's differ (the check is sensitive). Returns the
    three loss histories (:func:`record_iterations`)."""
    histories = []
    for poison in (None, "unlabeled", "labeled"):
        data = poisoned_la_dataset(tmp_path / f"la_{poison}", poison)
        workflow = make_workflow(
            ["train.json", f"methods/{method}.json"],
            bundle_overrides(data, tmp_path / f"out_{poison}", max_iterations=2, **overrides),
        )
        workflow.initialize()
        datalists = workflow.parser.get_parsed_content("datalists")
        assert datalists["unlabeled"] and all(set(item) == {"image"} for item in datalists["unlabeled"])
        assert "label" not in next(iter(workflow.parser.get_parsed_content("train#unlabeled_dataloader")))
        histories.append(record_iterations(workflow))
        run_workflow(workflow)
    assert len(histories[0]) == 2 and histories[0] == histories[1]
    assert histories[0] != histories[2]
    return histories
