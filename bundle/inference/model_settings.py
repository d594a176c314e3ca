"""The model's settings file, ``models/model_metadata.json``: everything inference needs, written with ``model.pt``.

A MONAI bundle describes its network in ``configs/metadata.json`` (``network_data_format``); a trained model here
carries the same description of itself next to its weights, plus the preprocessing and window settings it was trained
with, so that a model never meets data prepared differently. Written by training (:func:`describe_model`, saved by
:class:`bundle.engine.handlers.SaveStateDictOnCompletion`), read by ``configs/inference.json``, ``rank.json`` and
``evaluate.json`` (:func:`read_model_settings`), which refuse a setting that contradicts it
(:func:`check_given_settings`).

Keys (JSON): ``in_channels``, ``out_channels``, ``base_width``, ``network`` (class of the exported network,
``SoftmaxEnsemble`` or ``SoftmaxOutput``), ``channel_names`` (list, channel order), ``labels`` (``{name: value}``),
``orientation`` (``"RAS"``), ``spacing`` (``[x, y, z]`` mm or ``null``), ``resample_factor``, ``intensity``
(``{"scheme": "zscore"}`` or ``{"scheme": "ct", "lower", "upper", "mean", "std"}``, one value per channel),
``patch_size``, ``sw_strides``, ``network_def`` (the MONAI config that rebuilds the exported network:
:func:`bundle.networks.described.network_config`; absent in models trained before it was stored), ``method`` (the
training method's class), ``commit`` (git commit of the bundle, or ``null``), ``format_version``, and
``network_data_format`` (MONAI bundle metadata format: inputs/outputs with ``num_channels`` and ``channel_def``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from bundle.config.errors import BundleError
from bundle.data.settings import check_spacing, resolve_data_settings
from bundle.networks.described import build_network, network_config

#: name of the settings file, in the folder of ``model.pt``.
SETTINGS_FILE = "model_metadata.json"
FORMAT_VERSION = 1
#: settings a command line or config may repeat; a value that differs from the model's is refused. The configs
#: leave ``sw_strides`` out: a window grid other than the training's is a speed / accuracy choice
#: (``configs/inference_fast.json``), not a contradiction.
CHECKED_SETTINGS = (
    "in_channels",
    "out_channels",
    "base_width",
    "network",
    "patch_size",
    "sw_strides",
    "resample_factor",
    "spacing",
    "intensity",
)
#: the values inference used before models carried settings (a ``model.pt`` without a settings file).
LEGACY_SETTINGS: Dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 2,
    "base_width": 16,
    "network": None,
    "patch_size": [32, 32, 32],
    "sw_strides": [16, 16, 16],
    "resample_factor": 1.0,
    "spacing": None,
    "intensity": {"scheme": "zscore"},
    "channel_names": None,
    "labels": None,
}


def settings_path(ckpt_path: str) -> str:
    """``<folder of ckpt_path>/model_metadata.json``."""
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), SETTINGS_FILE)


def _commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def describe_model(
    network: Any,
    method: str,
    in_channels: int,
    out_channels: int,
    base_width: int,
    patch_size: Sequence[int],
    sw_strides: Sequence[int],
    resample_factor: float,
    data_settings: Dict[str, Any],
    channel_names: Optional[Sequence[str]] = None,
    labels: Optional[Dict[str, int]] = None,
) -> Dict[str, Any]:
    """The settings of a model being trained (module docstring). ``network``: the exported inference network (its
    class name and the config that rebuilds it are stored); ``data_settings``:
    :func:`bundle.data.settings.resolve_data_settings`'s result. Channel and label names default to ``image`` /
    ``channel_<i>`` and ``background`` / ``foreground`` / ``class_<i>``."""
    if not channel_names:
        channel_names = ["image"] if in_channels == 1 else [f"channel_{i}" for i in range(in_channels)]
    if not labels:
        names = ["background", "foreground"] if out_channels == 2 else [f"class_{i}" for i in range(out_channels)]
        labels = {"background": 0, **{name: i for i, name in enumerate(names) if i}}
    if len(channel_names) != in_channels or len(labels) != out_channels:
        raise BundleError(
            "Invalid settings (config or command-line overrides):",
            [
                f"in_channels={in_channels} / out_channels={out_channels} differ from the dataset's "
                f"{len(channel_names)} channel(s) {list(channel_names)} / {len(labels)} label(s) {list(labels)}"
            ],
        )
    by_value = {int(v): str(k) for k, v in labels.items()}
    return {
        "format_version": FORMAT_VERSION,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "base_width": int(base_width),
        "network": type(network).__name__,
        "network_def": _network_def(network),
        "channel_names": [str(c) for c in channel_names],
        "labels": {str(k): int(v) for k, v in labels.items()},
        "orientation": "RAS",
        "spacing": data_settings["spacing"],
        "resample_factor": float(resample_factor),
        "intensity": data_settings["intensity"],
        "patch_size": [int(v) for v in patch_size],
        "sw_strides": [int(v) for v in sw_strides],
        "method": method,
        "commit": _commit(),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": int(in_channels),
                    "spatial_shape": [int(v) for v in patch_size],
                    "dtype": "float32",
                    "is_patch_data": True,
                    "channel_def": {str(i): name for i, name in enumerate(channel_names)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": int(out_channels),
                    "spatial_shape": [int(v) for v in patch_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(v): f"{by_value[v]} probability" for v in sorted(by_value)},
                }
            },
        },
    }


def _network_def(network: Any) -> Optional[Dict[str, Any]]:
    """:func:`~bundle.networks.described.network_config`, or ``None`` for a network that does not describe itself
    (inference then builds the configs' V-Net or ensemble, as for models trained before ``network_def``)."""
    try:
        return network_config(network)
    except TypeError:
        return None


def write_model_settings(settings: Dict[str, Any], path: str) -> None:
    """Write ``settings`` as JSON to ``path`` under a temporary name, then rename (never half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".model_metadata-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(settings, stream, indent=4)
            stream.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_model_settings(ckpt_path: Optional[str]) -> Dict[str, Any]:
    """The settings stored with the weights ``ckpt_path`` (``<its folder>/model_metadata.json``), with ``source``
    set to that file; without such a file (a model trained before settings were stored, or no ``ckpt_path``), the
    values inference used before (:data:`LEGACY_SETTINGS`) with ``source`` ``None``. Raises :class:`BundleError`
    naming the file when it is not readable JSON or lacks a key."""
    path = settings_path(ckpt_path) if ckpt_path else None
    if path is None or not os.path.isfile(path):
        return {**LEGACY_SETTINGS, "source": None}
    try:
        with open(path) as handle:
            settings = json.load(handle)
    except (OSError, ValueError) as err:
        raise BundleError("Cannot read the model's settings:", [f"{path}: not readable JSON ({err})"]) from err
    missing = [key for key in LEGACY_SETTINGS if key not in settings]
    if missing:
        raise BundleError("Cannot read the model's settings:", [f"{path}: lacks {missing}"])
    return {**settings, "source": path}


def _same(model: Any, given: Any) -> bool:
    if isinstance(model, (list, tuple)) and isinstance(given, (list, tuple)):
        return len(model) == len(given) and all(_same(m, g) for m, g in zip(model, given))
    if isinstance(model, (int, float)) and isinstance(given, (int, float)):
        return abs(float(model) - float(given)) <= 1e-6 * max(1.0, abs(float(model)))
    return model == given


def contradictions(settings: Dict[str, Any], given: Dict[str, Any]) -> List[str]:
    """One line per setting of ``given`` that differs from the model's: ``setting: the model has X, given Y``.
    ``spacing: "median"`` and an ``intensity`` scheme name equal to the model's scheme are the rules that produced the
    model's values, not contradictions."""
    lines = []
    for key, value in given.items():
        if key not in CHECKED_SETTINGS:
            raise KeyError(f"contradictions: '{key}' is not a checked setting {CHECKED_SETTINGS}.")
        model = settings.get(key)
        if key == "spacing" and value == "median":
            continue
        if key == "intensity" and isinstance(value, str):
            model = (model or {}).get("scheme")
        if key == "network" and model is None:
            continue
        if not _same(model, value):
            lines.append(f"{key}: the model has {json.dumps(model)}, given {json.dumps(value)}")
    return lines


def check_given_settings(settings: Dict[str, Any], given: Dict[str, Any], title: str = "Cannot segment:") -> None:
    """Before anything is read or written: refuse every setting of ``given`` (the values the run would use, e.g.
    from the command line) that contradicts the model's settings file, one line each naming the setting, the model's
    value and the given one. Models without a settings file (``source`` ``None``) are not checked."""
    if "spacing" in given:
        check_spacing(given["spacing"])
    if settings.get("source") is None:
        return
    lines = contradictions(settings, given)
    if lines:
        raise BundleError(f"{title} settings contradict the model's {settings['source']}:", lines)


def model_data_settings(
    ckpt_path: str, items: Sequence[Dict[str, Any]], spacing: Any = "median", intensity: str = "zscore"
) -> Dict[str, Any]:
    """For evaluation: the model's stored ``spacing`` and ``intensity`` when it has a settings file, else resolved
    from ``items`` as training does (:func:`bundle.data.settings.resolve_data_settings`)."""
    settings = read_model_settings(ckpt_path)
    if settings["source"] is None:
        return resolve_data_settings(items, spacing, intensity)
    return {"spacing": settings["spacing"], "intensity": settings["intensity"]}


def model_network(settings: Dict[str, Any], single: Any, ensemble: Any) -> Any:
    """The inference network of a model (weights not loaded): rebuilt from its settings' ``network_def`` when it has
    one; for older models, ``single`` when its settings name ``SoftmaxOutput``, else ``ensemble`` (the configs'
    network definitions, which take the model's channels and width)."""
    if settings.get("network_def"):
        return build_network(settings["network_def"], f"{settings.get('source')}: network_def")
    return single if settings.get("network") == "SoftmaxOutput" else ensemble
