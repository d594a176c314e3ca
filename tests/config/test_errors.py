"""Components raise :class:`BundleError`; only the command-line entry points turn it into exit status 1."""

import subprocess
import sys

import pytest

from bundle.config.errors import BundleError, cli, find_bundle_error
from bundle.data.checks import check_writable, datalists_or_exit
from bundle.data.datalists import DatasetError
from bundle.inference.folder import INPUT_FORMATS as FORMATS
from tests.conftest import REPO_ROOT


def test_a_failing_check_raises_in_process(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError) as info:  # a ValueError the caller catches, not SystemExit
        check_writable([str(tmp_path / "file" / "models")])
    assert isinstance(info.value, ValueError) and not isinstance(info.value, SystemExit)
    assert info.value.title == "Output folders are not writable; nothing was trained:"
    assert info.value.lines[0].startswith(f"{tmp_path / 'file' / 'models'}: not writable")
    with pytest.raises(BundleError) as info:
        datalists_or_exit(dataset_dir=str(tmp_path / "nope"))
    message = f"Data check failed:\n  {tmp_path / 'nope'}: dataset_dir does not exist or is not a folder."
    assert str(info.value) == message
    assert issubclass(DatasetError, BundleError)


def test_the_error_is_found_behind_monai_wrapping():
    try:
        try:
            raise BundleError("Cannot segment:", ["a.nii.gz: broken"])
        except BundleError as err:
            raise RuntimeError("Failed to instantiate component 'datalist'") from err
    except RuntimeError as wrapped:
        assert str(find_bundle_error(wrapped)) == "Cannot segment:\n  a.nii.gz: broken"
    assert find_bundle_error(RuntimeError("other")) is None


def test_cli_context_turns_the_error_into_exit_status_1():
    with pytest.raises(SystemExit) as info:
        with cli():
            raise RuntimeError("wrapped") from BundleError("Cannot rank:", ["x: no scans"])
    assert info.value.code == "Cannot rank:\n  x: no scans"
    with pytest.raises(KeyError):  # other errors keep their traceback
        with cli():
            raise KeyError("k")


def test_bundle_run_exits_1_with_the_report_as_last_output(tmp_path):
    """``monai.bundle run`` through the configs' first initialize step: the report, no traceback, exit status 1."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--dataset_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-2:] == [
        "Cannot segment:",
        f"  {tmp_path / 'nope'}: no images found in this pattern (no such folder) {FORMATS}.",
    ]
