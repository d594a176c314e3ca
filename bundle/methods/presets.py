"""The method presets of ``configs/methods/``, and what their method classes declare about them.

A preset ``configs/methods/<name>.json`` sets ``method#_target_`` (e.g. ``dual_journal`` and ``supervised`` both use
:class:`~bundle.methods.dual_network.DualNetworkMethod` with other weights). Facts about a method live on its class
(:class:`~bundle.methods.base.SSLMethod`: ``reference_preset``, ``stateful_terms``); the benchmark report, the
MONAI Label app and the tests ask this module instead of keeping method lists. A method's inference network needs
no declaration: ``models/model_metadata.json`` carries the config that rebuilds it
(:mod:`bundle.networks.described`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import List, Optional

#: the presets' folder (``configs/methods/`` of the bundle).
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"


def preset_names() -> List[str]:
    """Every preset, sorted: the overlays of :data:`PRESETS_DIR` that configure a ``method`` (not the inference
    overlays)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json") if _method_target(path) is not None)


def _method_target(path: Path) -> Optional[str]:
    with open(path) as handle:
        method = json.load(handle).get("method")
    return method.get("_target_") if isinstance(method, dict) else None


def method_class(preset: str) -> type:
    """The method class a preset configures. Raises ``ValueError`` naming the known presets for an unknown one."""
    path = PRESETS_DIR / f"{preset}.json"
    target = _method_target(path) if path.is_file() else None
    if target is None:
        raise ValueError(f"{preset!r} is not a method preset of {PRESETS_DIR}; known: {preset_names()}.")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def reference_of(preset: str) -> Optional[str]:
    """The supervised-only preset ``preset`` is measured against, or ``None`` when it is a reference itself."""
    reference = method_class(preset).reference_preset
    return None if reference == preset else reference
