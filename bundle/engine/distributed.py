"""Multi-process training (``torchrun``) helpers used by ``configs/multi_gpu_train.json``.

The overlay runs one process per GPU (or several CPU processes with the ``gloo`` backend):

* :func:`init_process_group` joins the process group that ``torchrun`` describes in the environment (``nccl`` on
  GPU, ``gloo`` on CPU) and registers :func:`destroy_process_group` to run at interpreter exit, so the group is torn
  down even when building a component fails before training starts;
* :class:`DistributedMethod` wraps the whole method plug-in in ``DistributedDataParallel``: the trainer calls the
  method through ``forward``, so the gradients of every trainable subnet are averaged over the processes; frozen
  networks (EMA teachers, ``requires_grad=False``) are not reduced but are broadcast from rank 0 at construction
  and then updated identically on every rank by the method's post-step hook;
* :func:`run_training` runs the trainer, makes every rank's buffers equal to rank 0's at the end, and destroys the
  process group on success and on error.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from ignite.engine import Engine
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger("bundle.engine.distributed")

#: environment variables that ``torchrun`` sets for every process and :func:`init_process_group` needs.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``, set by ``torchrun``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")


def is_main_process() -> bool:
    """True in a single-process run and on rank 0 of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_process_group(backend: Optional[str] = None) -> None:
    """Join the process group described by ``torchrun``'s environment variables (``env://``).

    Args:
        backend: ``"nccl"``, ``"gloo"``, ...; ``None`` picks ``nccl`` when CUDA is available, else ``gloo``.

    Does nothing if a group is already initialised. Raises ``RuntimeError`` naming the missing variables when the
    process was not started by ``torchrun`` (or an equivalent launcher).
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; multi-process training needs it.")
    if dist.is_initialized():
        return
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"configs/multi_gpu_train.json must be launched with torchrun (missing environment variables {missing}), "
            "e.g. torchrun --nproc_per_node=2 -m monai.bundle run training "
            "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\"."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(destroy_process_group)
    logger.info(f"rank {dist.get_rank()}/{dist.get_world_size()} joined the process group ({backend})")


def destroy_process_group(barrier: bool = False) -> None:
    """Destroy every process group if one is initialised (safe to call more than once).

    Args:
        barrier: wait for every rank first (on success, so that no rank tears its connections down while rank 0 is
            still writing checkpoints); leave it off on an error path, where the other ranks may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def maybe_sync_batchnorm(module: nn.Module, enabled: bool, device: torch.device | str) -> nn.Module:
    """Convert every ``BatchNorm`` layer of ``module`` to ``SyncBatchNorm`` when ``enabled`` (returns the module).

    The layers keep their parameters and running statistics. PyTorch synchronises batch statistics only on
    accelerators: on a CPU ``device`` the conversion is skipped with a warning and ordinary per-process BatchNorm is
    kept.
    """
    if not enabled:
        return module
    if torch.device(device).type == "cpu":
        warnings.warn("sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm rejects CPU tensors); keeping BatchNorm.")
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


class DistributedMethod(DistributedDataParallel):
    """``DistributedDataParallel`` over a method plug-in that still answers the plug-in's API.

    Attributes that DDP itself does not have (``inference_network``, ``trainable_parameters``, ``uses_unlabeled``,
    ...) are looked up on the wrapped method, so configs that refer to ``@network`` work unchanged whether
    ``network`` is the method or this wrapper. Checkpoints stay free of the ``module.`` prefix because ignite's
    ``Checkpoint`` (MONAI's ``CheckpointSaver``/``CheckpointLoader``) unwraps DDP.

    Args and keyword arguments are those of ``DistributedDataParallel`` (``module``, ``device_ids``,
    ``find_unused_parameters``, ...).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "module" or "module" not in modules:
                raise
            return getattr(modules["module"], name)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) into every rank's ``module``.

    DDP broadcasts buffers at the start of each forward; after the last one every rank has updated them from its
    own batch, so without this call only the parameters are guaranteed equal at the end of training.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)


def run_training(trainer: Engine) -> None:
    """``trainer.run()``, then :func:`broadcast_buffers` of the trained module, and :func:`destroy_process_group`
    whether training succeeded or raised."""
    try:
        trainer.run()
        network = getattr(trainer, "network", None)
        if isinstance(network, nn.Module):
            broadcast_buffers(getattr(network, "module", network))
    except BaseException:
        destroy_process_group()
        raise
    destroy_process_group(barrier=True)
