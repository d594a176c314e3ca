"""The method presets of ``configs/methods/`` and what their classes declare: reference runs, inference overlays."""

import pytest

from bundle.methods.base import SSLMethod
from bundle.methods.presets import PRESETS_DIR, inference_overlays, method_class, preset_names, reference_of
from tests.conftest import REPO_ROOT
from tests.training_helpers import PRESET_OVERRIDES


def test_every_preset_is_declared_and_tested():
    names = preset_names()
    assert "dual_journal" in names and "ducisc_inference" not in names
    assert sorted(PRESET_OVERRIDES) == names  # the per-preset regression test covers every preset
    assert all(issubclass(method_class(name), SSLMethod) for name in names)


def test_references_are_the_supervised_presets_of_the_same_networks():
    references = {name: reference_of(name) for name in preset_names()}
    assert {name for name, ref in references.items() if ref is None} == {"supervised", "supervised_vnet"}
    assert references["dual_journal"] == references["dual_isbi"] == "supervised"
    assert {references[name] for name in ("mean_teacher", "ua_mt", "cps", "bcp", "ducisc", "dycon")} == {
        "supervised_vnet"
    }
    assert all(method_class(ref) is not None for ref in references.values() if ref)


def test_inference_overlays_exist_and_match_the_exported_network():
    for name in preset_names():
        for overlay in inference_overlays(name):
            assert (REPO_ROOT / "configs" / overlay).is_file(), (name, overlay)
    assert inference_overlays("dual_journal") == [] and inference_overlays("supervised") == []
    assert inference_overlays("ducisc") == ["methods/ducisc_inference.json"]
    assert inference_overlays("mean_teacher") == ["inference_single_net.json"]


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'nope' is not a method preset of .*known: \['bcp'"):
        method_class("nope")
    with pytest.raises(ValueError, match="is not a method preset"):
        method_class("ducisc_inference")  # an inference overlay, not a preset
    assert PRESETS_DIR == REPO_ROOT / "configs" / "methods"
