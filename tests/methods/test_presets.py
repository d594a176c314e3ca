"""The method presets of ``configs/methods/`` and what their classes declare; every exported network rebuilt from its
recorded config."""

import json

import pytest
import torch

from bundle.methods.base import SSLMethod
from bundle.methods.presets import PRESETS_DIR, method_class, preset_names, reference_of
from bundle.networks.described import build_network, network_config
from tests.conftest import REPO_ROOT
from tests.training_helpers import PRESET_OVERRIDES, make_workflow


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


@pytest.mark.parametrize("preset", sorted(PRESET_OVERRIDES))
def test_every_exported_network_is_rebuilt_from_its_recorded_config(preset, tmp_path):
    """What ``model_metadata.json`` stores (``network_def``) rebuilds each preset's exported network: JSON round
    trip, strict state-dict load, and the same output in eval."""
    overrides = {"dataset_dir": str(tmp_path), "base_width": 4, **PRESET_OVERRIDES[preset]}
    workflow = make_workflow(["train.json", f"methods/{preset}.json"], overrides)
    exported = workflow.parser.get_parsed_content("network_def").eval()
    config = json.loads(json.dumps(network_config(exported)))
    rebuilt = build_network(config).eval()
    rebuilt.load_state_dict(exported.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), exported(x))
    assert type(rebuilt) is type(exported) and config["_target_"].startswith("bundle.networks.")


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'nope' is not a method preset of .*known: \['bcp'"):
        method_class("nope")
    with pytest.raises(ValueError, match="is not a method preset"):
        method_class("ducisc_inference")  # an inference overlay, not a preset
    assert PRESETS_DIR == REPO_ROOT / "configs" / "methods"
