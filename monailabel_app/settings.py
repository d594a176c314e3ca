"""The app's settings (from MONAI Label's ``--conf key value`` pairs) and the bundle configs they select.

Every task of the app reads the bundle from this checkout (``BUNDLE_ROOT``: the repository root, which is the
bundle): ``configs/train.json`` (+ a method overlay) to train, ``configs/inference.json`` (+ the method's inference
overlay) to segment, and ``configs/rank.json`` on top of it to score. Nothing is downloaded.

``--conf`` keys (all optional):

* ``model_dir``: where ``model.pt`` is written by training and read by inference and scoring (default the bundle's
  ``models/``, as for ``python -m monai.bundle run training``);
* ``work_dir``: training runs (logs, resume checkpoints, the datalist trained on) and scoring outputs (default
  ``runs/monailabel`` in the bundle);
* ``labels``: comma-separated class names, background first (default ``background,foreground``); their count is
  the networks' ``out_channels`` and the names (without the background) are the segments MONAI Label clients show;
* ``method``: ``dual`` (``configs/train.json`` alone, the default) or the name of an overlay in ``configs/methods/``
  (e.g. ``mean_teacher``); fixed per app so that inference always loads the network that training wrote;
* ``base_width``, ``patch_size`` (``32,32,32``): network width and training / sliding-window patch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from monai.bundle import ConfigParser

from bundle.methods.presets import preset_names

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])
CONFIGS = os.path.join(BUNDLE_ROOT, "configs")
DEFAULT_LABELS = ("background", "foreground")
DEFAULT_METHOD = "dual"


class AppConfigError(ValueError):
    """A ``--conf`` value the app cannot use; the message names the key."""


def _ints(key: str, text: str, count: Optional[int] = None) -> List[int]:
    try:
        values = [int(v) for v in str(text).replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError as err:
        raise AppConfigError(f"--conf {key} {text!r}: expected comma-separated integers ({err}).") from err
    if not values or (count is not None and len(values) != count) or any(v <= 0 for v in values):
        raise AppConfigError(f"--conf {key} {text!r}: expected {count or 'some'} positive integers.")
    return values


@dataclass(frozen=True)
class AppSettings:
    """What every task of the app needs; built once from the app's ``conf`` (:meth:`from_conf`)."""

    model_dir: str
    work_dir: str
    labels: Tuple[str, ...] = DEFAULT_LABELS
    method: str = DEFAULT_METHOD
    base_width: int = 16
    patch_size: Tuple[int, int, int] = (32, 32, 32)

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> "AppSettings":
        """Settings from MONAI Label's ``conf`` (string values); raises :class:`AppConfigError` naming a bad key."""
        labels = tuple(name.strip() for name in str(conf.get("labels", ",".join(DEFAULT_LABELS))).split(","))
        if len(labels) < 2 or not all(labels) or len(set(labels)) != len(labels):
            raise AppConfigError(
                f"--conf labels {conf.get('labels')!r}: expected at least two distinct comma-separated names, "
                "background first."
            )
        method = str(conf.get("method", DEFAULT_METHOD))
        if method != DEFAULT_METHOD and not os.path.isfile(os.path.join(CONFIGS, "methods", f"{method}.json")):
            known = preset_names()
            raise AppConfigError(f"--conf method {method!r}: expected '{DEFAULT_METHOD}' or one of {known}.")
        return cls(
            model_dir=os.path.abspath(str(conf.get("model_dir", os.path.join(BUNDLE_ROOT, "models")))),
            work_dir=os.path.abspath(str(conf.get("work_dir", os.path.join(BUNDLE_ROOT, "runs", "monailabel")))),
            labels=labels,
            method=method,
            base_width=_ints("base_width", conf.get("base_width", "16"), 1)[0],
            patch_size=tuple(_ints("patch_size", conf.get("patch_size", "32,32,32"), 3)),  # type: ignore[arg-type]
        )

    @property
    def model_path(self) -> str:
        """The weights training writes and inference / scoring reload (``model_dir/model.pt``)."""
        return os.path.join(self.model_dir, "model.pt")

    @property
    def segment_labels(self) -> Dict[str, int]:
        """MONAI Label's ``labels``: segment name -> class index, the background left out."""
        return {name: index for index, name in enumerate(self.labels) if index > 0}

    def model_timestamp(self) -> Optional[float]:
        """Modification time of ``model.pt``, or ``None`` before the first training: scores are tied to it."""
        try:
            return os.stat(self.model_path).st_mtime
        except FileNotFoundError:
            return None

    def shared_overrides(self) -> Dict[str, Any]:
        """Overrides common to the training and inference configs."""
        return {
            "bundle_root": BUNDLE_ROOT,
            "out_channels": len(self.labels),
            "base_width": self.base_width,
            "patch_size": list(self.patch_size),
        }

    def training_configs(self) -> List[str]:
        """``configs/train.json`` plus the method's overlay."""
        files = [os.path.join(CONFIGS, "train.json")]
        if self.method != DEFAULT_METHOD:
            files.append(os.path.join(CONFIGS, "methods", f"{self.method}.json"))
        return files

    def inference_configs(self, extra: Sequence[str] = ()) -> List[str]:
        """``configs/inference.json`` then ``extra`` (names inside ``configs/``); the model's ``model_metadata.json``
        rebuilds its network, whatever the method."""
        return [os.path.join(CONFIGS, name) for name in ["inference.json", *extra]]

    def inference_parser(self, extra: Sequence[str] = (), **overrides: Any) -> ConfigParser:
        """A parser of :meth:`inference_configs` reading this app's ``model.pt``."""
        parser = ConfigParser()
        parser.read_config(self.inference_configs(extra))
        parser.update({**self.shared_overrides(), "ckpt_path": self.model_path, **overrides})
        return parser
