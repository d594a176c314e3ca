"""MONAI Model Zoo conformance, checked offline: what the Zoo's CI (``ci/verify_bundle.py``, unit tests, pre-commit)
checks on a bundle, run against this repository.

* ``configs/metadata.json`` validates against the Zoo's schema (kept in ``../shared``; that step is skipped where
  ``../shared`` is absent, but the schema's required keys are checked either way), has a changelog entry for its
  version, pins that match ``requirements.txt``, references to both papers and a ``network_data_format`` that
  matches the inference config;
* ``check_properties`` finds every property MONAI requires of the train, infer and train+evaluate workflows;
* ``verify_net_in_out`` and ``ckpt_export`` (TorchScript, equal to the eager ensemble) pass through the CLI;
* the package files exist, configs hold no personal paths and are 4-space-indented JSON, no file is over 1 MB.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle.data.synthetic import ensure_synthetic_dataset
from tests.conftest import REPO_ROOT, SHARED_DIR

CONFIGS = REPO_ROOT / "configs"
META_FILE = CONFIGS / "metadata.json"
SCHEMA = SHARED_DIR / "specs" / "zoo_meta_schema_20240725.json"
#: ``required`` of meta_schema_20240725.json (checked against the schema file when it is present).
SCHEMA_REQUIRED = [
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
]
#: keys the schema requires of every tensor in ``network_data_format``.
TENSOR_REQUIRED = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]
PAPER_TITLES = [
    "Enhancing Dual Network Based Semi-Supervised Medical Image Segmentation with Uncertainty-Guided Pseudo-Labeling",
    "Semi-supervised medical image segmentation via dual networks",
]
ONE_MB = 1024 * 1024


def metadata() -> dict:
    return json.loads(META_FILE.read_text())


def monai_bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` from the repository root, as the Zoo's CI and the model card run it."""
    command = [sys.executable, "-m", "monai.bundle", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def requirement_pins() -> dict:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not pinned with =="
            pins[name.strip().lower()] = version.strip()
    return pins


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    return ensure_synthetic_dataset(str(root), num_labeled=2, num_unlabeled=2, num_validation=1, shape=(20, 20, 18))


# ------------------------------------------------------------------------------------------------ metadata
@pytest.mark.skipif(not SCHEMA.is_file(), reason="../shared (the Zoo's metadata schema) is absent")
def test_verify_metadata_against_zoo_schema(tmp_path):
    schema = tmp_path / "schema.json"  # pre-placed, so verify_metadata does not download it
    shutil.copy(SCHEMA, schema)
    result = monai_bundle("verify_metadata", "--meta_file", str(META_FILE), "--filepath", str(schema))
    assert "metadata is verified with no error" in result.stdout + result.stderr
    assert set(json.loads(SCHEMA.read_text())["required"]) <= set(SCHEMA_REQUIRED)


def test_metadata_has_schema_required_keys_and_tensor_formats():
    meta = metadata()
    missing = [key for key in SCHEMA_REQUIRED if key not in meta]
    assert not missing, f"metadata.json lacks {missing}"
    assert meta["schema"].endswith("meta_schema_20240725.json")
    for section in ("inputs", "outputs"):
        assert meta["network_data_format"][section], section
        for name, tensor in meta["network_data_format"][section].items():
            assert not [k for k in TENSOR_REQUIRED if k not in tensor], (section, name)


def test_version_has_changelog_entry():
    meta = metadata()
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert meta["version"] in meta["changelog"]
    newest = max(meta["changelog"], key=lambda v: tuple(int(p) for p in v.split(".")))
    assert newest == meta["version"], "the version must be the newest changelog entry"


def test_version_pins_match_requirements():
    meta, pins = metadata(), requirement_pins()
    assert meta["monai_version"] == pins.pop("monai")
    assert meta["pytorch_version"] == pins.pop("torch")
    assert meta["numpy_version"] == pins.pop("numpy")
    assert meta["required_packages_version"] == pins


def test_metadata_references_papers_data_and_licences():
    meta = metadata()
    references = " ".join(meta["references"]).lower()
    for title in PAPER_TITLES:
        assert title.lower() in references, title
    for key in ("task", "description", "authors", "copyright", "data_source", "intended_use"):
        assert meta[key].strip(), key
    assert "data_license.txt" in meta["data_source"]


def test_network_data_format_matches_inference_config():
    meta = metadata()["network_data_format"]
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    image, pred = meta["inputs"]["image"], meta["outputs"]["pred"]
    channels = parser.get_parsed_content("in_channels"), parser.get_parsed_content("out_channels")
    assert (image["num_channels"], pred["num_channels"]) == channels
    assert image["spatial_shape"] == parser.get_parsed_content("patch_size") == pred["spatial_shape"]
    assert image["dtype"] == pred["dtype"] == "float32"


# ---------------------------------------------------------------------------------------- bundle properties
@pytest.mark.parametrize(
    "configs, workflow_type",
    [
        (["train.json"], "train"),
        (["inference.json"], "infer"),
        (["inference.json", "rank.json"], "infer"),
        # evaluate.json overrides train.json, so the Zoo's tests check it as a "train" workflow
        (["train.json", "evaluate.json"], "train"),
    ],
)
def test_check_properties_reports_nothing_missing(configs, workflow_type, tiny_dataset, tmp_path):
    dataset_dir = tiny_dataset if workflow_type == "train" else f"{tiny_dataset}/imagesTr"
    overrides = {"dataset_dir": dataset_dir, "output_dir": str(tmp_path), "base_width": 4}
    if workflow_type == "train":
        overrides.update(model_dir=str(tmp_path / "models"), patch_size=[16, 16, 16], num_labeled=2)
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs],
        meta_file=str(META_FILE),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


# --------------------------------------------------------------------------------- network in/out and export
def test_verify_net_in_out():
    result = monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--device",
        "cpu",
    )
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_ckpt_export_torchscript_equals_eager_ensemble(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    state = network.state_dict()
    for key, value in state.items():  # a random (untrained) state, BatchNorm statistics included
        if key.endswith("running_mean"):
            value.normal_(0.0, 0.2)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    torch.save(state, tmp_path / "model.pt")
    monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        str(tmp_path / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"), map_location="cpu")
    network.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    network.eval()
    channels, patch = parser.get_parsed_content("in_channels"), parser.get_parsed_content("patch_size")
    x = torch.rand(1, channels, *patch)
    with torch.no_grad():
        expected, actual = network(x), scripted(x)
    assert actual.shape == expected.shape == (1, parser.get_parsed_content("out_channels"), *patch)
    assert (actual - expected).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------- package files
def test_zoo_package_files_exist():
    for path in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json"):
        assert (REPO_ROOT / path).is_file(), path
    for path in ("configs/evaluate.json", "configs/multi_gpu_train.json", "configs/logging.conf", "large_files.yml"):
        assert (REPO_ROOT / path).is_file(), path
    for path in ("docs/README.md", "docs/data_license.txt", "models/README.md"):
        assert (REPO_ROOT / path).is_file(), path
    licence = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence


def test_model_card_has_zoo_sections():
    card = (REPO_ROOT / "docs" / "README.md").read_text().lower()
    for section in ("overview", "data", "training configuration", "performance", "commands", "limitations"):
        assert re.search(rf"^#+ .*{section}", card, re.MULTILINE), section
    assert "## references" in card and "results.md" in card
    for command in ("run training", "multi_gpu_train.json", "inference.json", "evaluate.json", "ckpt_export"):
        assert command in card, command


def test_large_files_yml_documents_the_format():
    text = (REPO_ROOT / "large_files.yml").read_text()
    for key in ("path:", "url:", "hash_val:", "hash_type:"):
        assert key in text, key


def repository_files():
    """Tracked files plus untracked ones git would add (what a commit of the working tree would hold)."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"]
    listing = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode()
    return [REPO_ROOT / name for name in listing.split("\0") if name]


def test_no_file_over_one_megabyte():
    large = [p for p in repository_files() if p.is_file() and p.stat().st_size > ONE_MB]
    report = [f"{p.relative_to(REPO_ROOT)} ({p.stat().st_size} B)" for p in large]
    assert not report, f"files over 1 MB belong in large_files.yml, not in git: {report}"


#: absolute or user-specific paths: home directories, mounts, Windows drives, ``~``.
PERSONAL_PATH = re.compile(
    r"(?:^|[\s'\"=(,])(?:/(?:home|Users|root|workspace|mnt|media|scratch|nfs|work)/|~/|[A-Za-z]:\\)"
)


def config_files():
    return sorted(CONFIGS.rglob("*.json"))


def test_configs_hold_no_personal_paths():
    found = []
    for path in config_files():
        for value in _strings(json.loads(path.read_text())):
            plain = not value.startswith(("$", "@", "%"))
            if PERSONAL_PATH.search(value) or (plain and value.startswith("/")):
                found.append(f"{path.relative_to(REPO_ROOT)}: {value}")
    assert not found, found


def test_configs_are_four_space_indented_json():
    bad = []
    for path in config_files():
        text = path.read_text()
        data = json.loads(text)
        if text not in {json.dumps(data, indent=4, ensure_ascii=a) + "\n" for a in (False, True)}:
            bad.append(str(path.relative_to(REPO_ROOT)))
    assert not bad, f"not 4-space-indented JSON (python -m json.tool --indent 4 --no-ensure-ascii): {bad}"


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
