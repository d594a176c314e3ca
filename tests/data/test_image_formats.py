"""Inference inputs beyond NIfTI: NRRD files and DICOM series folders land on their own grid, and a missing reader
is named before any work starts."""

import os

import nibabel as nib
import numpy as np
import pytest

from bundle.data import image_formats
from bundle.data.datalists import DatasetError
from bundle.data.image_formats import FormatError, case_name, is_dicom_series
from bundle.inference.folder import image_datalist
from tests.inference_helpers import inference_workflow

nrrd = pytest.importorskip("nrrd")
pydicom = pytest.importorskip("pydicom")

SHAPE = (20, 14, 9)  # x (DICOM columns), y (rows), z (slices)
SPACING = (0.7, 0.8, 2.5)
ORIGIN_LPS = (-10.0, -20.0, 30.0)
#: the RAS affine both formats must give: LPS -> RAS flips x and y.
EXPECTED_AFFINE = np.array(
    [[-0.7, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]],
)


def _scan() -> np.ndarray:
    """int16 noise in [0, 10) with a box of 100: after z-scoring, positive exactly on the box."""
    scan = np.random.default_rng(0).integers(0, 10, size=SHAPE).astype(np.int16)
    scan[2:9, 3:12, 1:4] = 100
    return scan


def write_nrrd(path, scan: np.ndarray) -> str:
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag(SPACING),
        "space origin": np.array(ORIGIN_LPS),
    }
    nrrd.write(str(path), scan, header)
    return str(path)


def write_dicom_series(folder, scan: np.ndarray, suffix: str = ".dcm") -> str:
    """One CT slice file per z (axial, LPS), no compression: what a scanner export holds."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(scan.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "anonymous", k + 1
        ds.ImagePositionPatient = [ORIGIN_LPS[0], ORIGIN_LPS[1], ORIGIN_LPS[2] + k * SPACING[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [SPACING[1], SPACING[0]], SPACING[2]
        ds.Rows, ds.Columns = scan.shape[1], scan.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(scan[:, :, k].T).tobytes()  # rows = y, columns = x
        ds.save_as(os.path.join(folder, f"slice{k:03d}{suffix}"), write_like_original=False)
    return str(folder)


def test_nrrd_and_dicom_series_are_segmented_on_their_grid(tmp_path):
    scan = _scan()
    (tmp_path / "in").mkdir()
    write_nrrd(tmp_path / "in" / "knee.nrrd", scan)
    write_dicom_series(tmp_path / "in" / "series_1", scan, suffix="")  # no suffix: found by the DICM marker
    (tmp_path / "in" / "notes").mkdir()
    (tmp_path / "in" / "notes" / "readme.txt").write_text("not a series")
    workflow = inference_workflow(tmp_path / "in", tmp_path / "out", precision="fp32")
    workflow.initialize()
    workflow.run()

    assert sorted(os.listdir(tmp_path / "out")) == ["knee.nii.gz", "manifest.json", "series_1.nii.gz"]
    for name in ("knee.nii.gz", "series_1.nii.gz"):
        mask = nib.load(str(tmp_path / "out" / name))
        assert mask.shape == SHAPE, name
        np.testing.assert_allclose(mask.affine, EXPECTED_AFFINE, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), scan == 100, err_msg=name)


def test_a_folder_that_is_one_series_is_one_case(tmp_path):
    series = write_dicom_series(tmp_path / "CT_0001", _scan())
    assert is_dicom_series(series) and not is_dicom_series(str(tmp_path))
    assert image_datalist(series) == [{"image": series, "case": "CT_0001"}]
    assert case_name(series + os.sep) == "CT_0001"


def test_dicom_series_for_a_multichannel_model_is_refused(tmp_path):
    write_dicom_series(tmp_path / "in" / "s1", _scan())
    with pytest.raises(DatasetError, match=r"s1: a DICOM series is one channel, but the model takes 2"):
        image_datalist(str(tmp_path / "in"), in_channels=2)


def test_a_missing_reader_is_named_before_anything_is_read(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    write_nrrd(tmp_path / "in" / "b.nrrd", _scan())
    write_dicom_series(tmp_path / "in" / "s1", _scan())
    monkeypatch.setattr(image_formats, "reader_installed", lambda name: name == "NIfTI")
    with pytest.raises(FormatError) as info:
        image_datalist(str(tmp_path / "in"))
    missing = "needs a reader that is not installed: pip install"
    assert str(info.value).splitlines() == [
        f"{tmp_path / 'in' / 'b.nrrd'}: reading NRRD {missing} pynrrd (or itk).",
        f"{tmp_path / 'in' / 's1'}: reading DICOM {missing} pydicom (or itk).",
    ]


def test_two_formats_of_one_case_are_refused(tmp_path):
    (tmp_path / "in").mkdir()
    write_nrrd(tmp_path / "in" / "a.nrrd", _scan())
    nib.save(nib.Nifti1Image(_scan(), np.eye(4)), str(tmp_path / "in" / "a.nii.gz"))
    with pytest.raises(DatasetError, match="would both be written as 'a.nii.gz'"):
        image_datalist(str(tmp_path / "in"))
