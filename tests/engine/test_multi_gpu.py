"""``configs/multi_gpu_train.json`` run for real with ``torchrun``: 2 CPU processes, the gloo backend, tiny data.

One 2-process run (module fixture) of ``train.json + multi_gpu_train.json`` plus a test-only overlay that attaches
:class:`DrawRecorder` is shared by the tests below; it records, per rank, every dataset index its labeled and
unlabeled samplers hand out (with the sampler epoch), and dumps the final method state after training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from torch import nn

from bundle.data.synthetic import ensure_synthetic_dataset
from bundle.engine import distributed
from tests.conftest import REPO_ROOT
from tests.training_helpers import at_first_iteration
from tests.training_helpers import tiny_overrides as training_overrides

ITERATIONS = 3


class DrawRecorder:
    """Test-only handler: which items each rank draws from both streams, and the state each rank ends with.

    Every index a sampler yields is recorded as ``(sampler epoch, item image file name)``; the sampler object is
    given a recording subclass so the record is what the data loader consumed, not a re-computation.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.rank = int(os.environ.get("RANK", 0))
        self.draws = {"labeled": [], "unlabeled": []}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)  # the trainer's loaders are set after handlers
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _started(self, engine: Engine) -> None:
        self._record(engine.data_loader, "labeled")
        if engine.unlabeled_data_loader is not None:
            self._record(engine.unlabeled_data_loader, "unlabeled")

    def _record(self, loader, stream: str) -> None:
        sampler, names, log = loader.sampler, [item["image"] for item in loader.dataset.data], self.draws[stream]

        def recording_iter(this):
            for index in super(type(this), this).__iter__():
                log.append((int(getattr(this, "epoch", -1)), os.path.basename(names[index])))
                yield index

        sampler.__class__ = type(f"Recording{type(sampler).__name__}", (type(sampler),), {"__iter__": recording_iter})

    def _iteration_completed(self, engine: Engine) -> None:
        self.iterations = engine.state.iteration

    def dump(self, network: nn.Module) -> None:
        """Write ``rank<r>.json`` (draws, pid) and ``rank<r>.pt`` (the method's state dict) into ``output_dir``."""
        os.makedirs(self.output_dir, exist_ok=True)
        method = getattr(network, "module", network)
        torch.save(method.state_dict(), os.path.join(self.output_dir, f"rank{self.rank}.pt"))
        record = {"pid": os.getpid(), "draws": self.draws, "iterations": self.iterations}
        with open(os.path.join(self.output_dir, f"rank{self.rank}.json"), "w") as handle:
            json.dump(record, handle)


def torchrun(configs, overrides, probe_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node=2 -m monai.bundle run training`` (a free rendezvous port is
    picked by ``--standalone``) with ``configs`` + a probe overlay attaching :class:`DrawRecorder`."""
    probe = {
        "draw_recorder": {"_target_": "tests.engine.test_multi_gpu.DrawRecorder", "output_dir": str(probe_dir)},
        "+train#handlers": ["@draw_recorder"],
        "+finalize": ["$@draw_recorder.dump(@network)"],
    }
    probe_file = probe_dir.parent / f"{probe_dir.name}_probe.json"
    probe_file.write_text(json.dumps(probe, indent=4))
    files = [f"configs/{c}" for c in configs] + [str(probe_file)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "monai.bundle", "run", "training", "--config_file", repr(files)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value).replace(" ", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_overrides(dataset_dir, out_dir, **extra):
    """The tiny run of ``tests/engine/test_training.py`` with 4 labeled items and ``ITERATIONS`` iterations."""
    settings = {"num_labeled": 4, "max_iterations": ITERATIONS, "val_interval": ITERATIONS, **extra}
    return training_overrides(dataset_dir, out_dir, **settings)


def load_records(probe_dir: Path):
    return [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_same_state(probe_dir: Path) -> dict:
    states = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{key} differs between rank 0 and rank 1"
    return states[0]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    return ensure_synthetic_dataset(str(root), num_labeled=4, num_unlabeled=4, num_validation=2, shape=(20, 20, 18))


@pytest.fixture(scope="module")
def two_process_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun(["train.json", "multi_gpu_train.json"], tiny_overrides(tiny_dataset, out), out / "probe")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


def test_two_processes_train_and_only_rank0_writes(two_process_run):
    out, result = two_process_run
    log = result.stdout + result.stderr
    assert f"iteration {ITERATIONS}/{ITERATIONS}" in log
    assert "val_mean_dice" in log
    records = load_records(out / "probe")
    assert [r["iterations"] for r in records] == [ITERATIONS, ITERATIONS]
    assert (out / "models" / "model.pt").is_file()
    assert (out / "checkpoints" / "checkpoint_final.pt").is_file()
    events = list((out / "tensorboard").iterdir())
    assert events and all(f".{records[0]['pid']}." in f.name for f in events), (records[0]["pid"], events)


def test_ranks_end_with_identical_weights(two_process_run):
    out, _ = two_process_run
    state = assert_same_state(out / "probe")
    assert any("running_mean" in key for key in state)  # BatchNorm buffers are compared too
    deployed = torch.load(out / "models" / "model.pt", weights_only=True)
    for key, value in deployed.items():  # rank 0 wrote the deploy weights of this very state
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_ranks_draw_disjoint_items_and_reshuffle_each_epoch(two_process_run):
    out, _ = two_process_run
    records = load_records(out / "probe")
    for stream in ("labeled", "unlabeled"):
        by_epoch = [{}, {}]
        for rank, record in enumerate(records):
            for epoch, name in record["draws"][stream]:
                by_epoch[rank].setdefault(epoch, []).append(name)
        assert by_epoch[0].keys() == by_epoch[1].keys() and len(by_epoch[0]) >= 2, (stream, by_epoch)
        epochs = sorted(by_epoch[0])  # set_epoch(e), e = e0, e0 + 1, ... before each pass: a new shuffle each time
        assert epochs == list(range(epochs[0], epochs[0] + len(epochs))), (stream, epochs)
        for epoch in by_epoch[0]:
            first, second = by_epoch[0][epoch], by_epoch[1][epoch]
            assert not set(first) & set(second), f"{stream} epoch {epoch}: both ranks drew {set(first) & set(second)}"
            assert len(first + second) == 4  # together the two shards cover the 4 items of the stream once


def test_two_process_checkpoint_resumes_in_one_process(two_process_run, tiny_dataset, tmp_path):
    out, _ = two_process_run
    checkpoint = out / "checkpoints" / "checkpoint_final.pt"
    overrides = tiny_overrides(tiny_dataset, tmp_path, max_iterations=ITERATIONS + 1, resume_from=str(checkpoint))
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "train.json"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="train",
        **overrides,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    method = workflow.parser.get_parsed_content("network")
    seen = at_first_iteration(trainer, state=lambda: {k: v.clone() for k, v in method.state_dict().items()})

    workflow.run()
    workflow.finalize()
    assert seen["iteration"] == ITERATIONS + 1
    assert trainer.state.iteration == ITERATIONS + 1
    final = assert_same_state(out / "probe")
    for key, value in seen["state"].items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)


@pytest.mark.skipif(
    not (REPO_ROOT / "configs" / "methods" / "mean_teacher.json").is_file(), reason="no Mean Teacher preset"
)
def test_ema_teacher_identical_on_both_ranks(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, tmp_path, max_iterations=2, val_interval=100)
    result = torchrun(["train.json", "methods/mean_teacher.json", "multi_gpu_train.json"], overrides, tmp_path / "p")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    state = assert_same_state(tmp_path / "p")
    teacher = [key for key in state if key.startswith("teacher.")]
    student = {key[len("teacher.") :] for key in teacher}
    assert teacher and all(f"student.{key}" in state for key in student)
    assert any(not torch.equal(state[k], state["student." + k[len("teacher.") :]]) for k in teacher if "weight" in k)


# ------------------------------------------------------------------------------------------ in-process units
def test_overlay_refuses_to_run_without_torchrun(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_process_group()


def test_sync_batchnorm_option():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert distributed.maybe_sync_batchnorm(net, True, "cpu") is net
    assert isinstance(net[1], nn.BatchNorm3d) and any("sync_batchnorm" in str(w.message) for w in caught)
    weight = net[1].weight
    converted = distributed.maybe_sync_batchnorm(net, True, "cuda:0")
    assert isinstance(converted[1], nn.SyncBatchNorm) and converted[1].weight is weight
    assert distributed.maybe_sync_batchnorm(nn.BatchNorm3d(2), False, "cuda:0").__class__ is nn.BatchNorm3d
