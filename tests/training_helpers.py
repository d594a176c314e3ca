"""Shared helpers of the training tests: tiny settings, the bundle workflow, loss recording, state comparison, and
the per-preset settings of the tiny runs."""

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from torch import nn

from tests.conftest import REPO_ROOT


def tiny_overrides(dataset_dir, out_dir, **extra):
    overrides = {
        "dataset_dir": dataset_dir,
        "output_dir": str(out_dir),
        "model_dir": str(out_dir / "models"),
        "patch_size": [16, 16, 16],
        "base_width": 4,
        "num_labeled": 2,
        "max_iterations": 3,
        "val_interval": 3,
        "train#checkpoint_saver#save_interval": 2,
        "validate#inferer#sw_batch_size": 2,
        "train#trainer#precision": "fp32",  # exact values on any CPU; bf16 has its own tests (test_precision.py)
    }
    overrides.update(extra)
    return overrides


def make_workflow(configs, overrides):
    files = [str(REPO_ROOT / "configs" / c) for c in configs]
    return ConfigWorkflow(
        config_file=files,
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="train",
        **overrides,
    )


def at_first_iteration(trainer, **probes):
    """A dict filled when ``trainer`` starts its first iteration (of this run, e.g. after a resume): ``iteration``
    (ignite's, from 1) and each probe's value (``name=callable``)."""
    seen = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _record(engine):
        if not seen:
            seen.update(iteration=engine.state.iteration, **{name: probe() for name, probe in probes.items()})

    return seen


def run_workflow(workflow):
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def flatten_state(state, prefix=""):
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flatten_state(value, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)) and not all(isinstance(v, (int, float)) for v in state):
        return {k: v for i, value in enumerate(state) for k, v in flatten_state(value, f"{prefix}{i}.").items()}
    return {prefix: state}


def same_value(a, b):
    return torch.equal(a, b) if torch.is_tensor(a) and torch.is_tensor(b) else a == b


def tiny_conv_net(seed=0, out_channels=2):
    """A 3D conv net small enough for exact gradient checks; returns logits ``(B, out_channels, *spatial)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, out_channels, 1))


def train_and_record(configs, overrides):
    """Run a training workflow, returning it and the loss entries of every iteration (floats)."""
    workflow = make_workflow(configs, overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    records = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        records.append({k: float(v) for k, v in engine.state.output.items() if k.startswith("loss")})

    workflow.run()
    workflow.finalize()
    return workflow, records


#: per preset, what differs from the tiny run of ``tests/engine/test_training.py`` (BCP needs 32^3 patches for its half
#: batches at the bottleneck, DyCON a 32x32x16 patch for its 8^3 tokens and a small projection head).
PRESET_OVERRIDES = {
    "dual_journal": {},
    "dual_isbi": {},
    "supervised": {},
    "supervised_vnet": {},
    "mean_teacher": {},
    "ua_mt": {},
    "cps": {},
    "bcp": {"patch_size": [32, 32, 32], "method#pretrain_iterations": 1},
    "ducisc": {},
    "dycon": {
        "patch_size": [32, 32, 16],
        "method#student#embed_channels": 16,
        "method#student#hidden_channels": 32,
    },
}
