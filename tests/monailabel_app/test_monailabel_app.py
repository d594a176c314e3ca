"""The MONAI Label app (``monailabel_app/``) against a real ``monailabel start_server`` on 127.0.0.1.

A temporary datastore holds 3 labeled and 5 unlabeled synthetic 32^3 volumes (with a non-identity affine) plus one
truncated file. Through the REST API: ``/info`` lists the model and its segments, ``/infer`` returns a mask on the
image's grid (shape and affine), ``/train`` runs the bundle's semi-supervised training on the datastore and the next
``/infer`` uses the new weights, ``/activelearning`` serves the unlabeled image whose subnets disagree most (the
same as ``configs/rank.json`` computes on the same images), and the broken file is reported and skipped while the
server stays up. The server is stopped by its process id, also when a check fails.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from bundle.data.synthetic import synthetic_volume  # noqa: E402
from bundle.inference.model_settings import LEGACY_SETTINGS, SETTINGS_FILE, write_model_settings  # noqa: E402
from bundle.networks.described import network_config  # noqa: E402
from bundle.networks.subnets import SoftmaxOutput, VNetSeg  # noqa: E402
from monailabel_app.main import MODEL, STRATEGY  # noqa: E402
from monailabel_app.scoring import DISAGREEMENT, SCORE, image_scores, rank_images  # noqa: E402
from monailabel_app.settings import AppConfigError, AppSettings  # noqa: E402
from monailabel_app.train import datastore_items, training_length, training_workflow, usable_items  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, 1.25, 0, -7.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
LABELED = [f"case_l{i}" for i in range(3)]
UNLABELED = [f"case_u{i}" for i in range(5)]
BROKEN = "case_x_broken"
CONF = {"base_width": "4", "labels": "background,lesion"}


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def make_datastore(root: Path) -> Path:
    """3 labeled + 5 unlabeled 32^3 volumes and one truncated ``.nii.gz``, in MONAI Label's local layout."""
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for name in LABELED + UNLABELED:
        image, label = synthetic_volume(rng, (32, 32, 32))
        _save(image.astype(np.float32), studies / f"{name}.nii.gz")
        if name in LABELED:
            _save(label.astype(np.uint8), studies / "labels" / "final" / f"{name}.nii.gz")
    whole = (studies / f"{UNLABELED[0]}.nii.gz").read_bytes()
    (studies / f"{BROKEN}.nii.gz").write_bytes(whole[: len(whole) // 2])
    return studies


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def settings_for(work: Path) -> AppSettings:
    return AppSettings.from_conf({**CONF, "model_dir": str(work / "model"), "work_dir": str(work / "work")})


class Server:
    """``monailabel start_server`` in its own process group, on a free loopback port."""

    def __init__(self, studies: Path, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        conf = {**CONF, "model_dir": str(work / "model"), "work_dir": str(work / "work")}
        command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "monailabel_app")]
        command += ["--studies", str(studies), "--host", HOST, "--port", str(self.port)]
        for key, value in conf.items():
            command += ["--conf", key, value]
        env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "OMP_NUM_THREADS": "1"}
        self.log = open(work / "server.log", "w")
        self.process = subprocess.Popen(
            command, cwd=str(work), env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, f"server exited with {self.process.returncode}:\n{self.tail()}"
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server not up after {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text().splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server's own process group (the server and the training / scoring processes it started)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.log.close()


def read_nifti(content: bytes) -> nib.Nifti1Image:
    data = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(data)


def infer(server: Server, image_id: str) -> tuple:
    """``/infer`` on a datastore image: (mask, result params)."""
    from requests_toolbelt import MultipartDecoder

    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": image_id, "output": "all"}, timeout=300)
    assert response.status_code == 200, response.text
    parts = {}
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        name = part.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]
        parts[name] = part.content
    return read_nifti(parts["image"]), json.loads(parts["params"])


def rank_with_bundle(model: Path, studies: Path, out: Path) -> dict:
    """``configs/rank.json`` on the unlabeled images (the command line's ranking), scan -> row."""
    scans = out / "scans"
    scans.mkdir(parents=True)
    for name in UNLABELED:
        os.symlink(studies / f"{name}.nii.gz", scans / f"{name}.nii.gz")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    command += ["['configs/inference.json','configs/rank.json']", "--bundle_root", str(ROOT)]
    command += ["--ckpt_path", str(model), "--dataset_dir", str(scans), "--output_dir", str(out)]
    command += ["--base_width", CONF["base_width"], "--rank_figure_scans", "0"]
    subprocess.run(command, cwd=str(ROOT), check=True, capture_output=True, timeout=300)
    with open(out / "ranking.csv") as stream:
        return {row["scan"]: row for row in csv.DictReader(stream)}


def data_files() -> set:
    return {str(p) for p in (ROOT / "data").rglob("*")} if (ROOT / "data").exists() else set()


def test_datastore_images_reach_the_unlabeled_loader(tmp_path):
    """The datastore's unlabeled images (not the broken one) are the unlabeled loader's data; nothing synthetic."""
    studies = make_datastore(tmp_path)
    from monailabel.datastore.local import LocalDatastore

    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    settings = settings_for(tmp_path)
    labeled, unlabeled = datastore_items(datastore)
    assert sorted(Path(i["image"]).name for i in labeled) == [f"{n}.nii.gz" for n in LABELED]
    unlabeled, problems = usable_items(unlabeled, num_classes=2)
    assert len(problems) == 1 and problems[0].startswith(str(studies / f"{BROKEN}.nii.gz"))
    before = data_files()
    workflow = training_workflow(settings, labeled, unlabeled, str(tmp_path / "run"), iterations=2)
    workflow.initialize()
    loader = workflow.parser.get_parsed_content("train#unlabeled_dataloader")
    assert sorted(Path(i["image"]).name for i in loader.dataset.data) == [f"{n}.nii.gz" for n in UNLABELED]
    batch = next(iter(loader))
    assert set(batch) == {"image"} and batch["image"].shape[1:] == (1, 32, 32, 32)
    assert data_files() == before, "training created files under data/ (the synthetic dataset)"


def test_settings_and_training_length():
    """Bad ``--conf`` values are named; MONAI Label's ``max_epochs`` sets the length unless ``max_iterations`` does."""
    for conf, key in [({"method": "nope"}, "method"), ({"labels": "background"}, "labels")]:
        with pytest.raises(AppConfigError, match=f"--conf {key}"):
            AppSettings.from_conf(conf)
    with pytest.raises(AppConfigError, match="--conf patch_size"):
        AppSettings.from_conf({"patch_size": "32,32"})
    assert training_length({"max_epochs": 3}, num_labeled=3) == 6  # 3 passes of ceil(3 / 2) batches
    assert training_length({"max_epochs": 3, "max_iterations": 5}, num_labeled=3) == 5
    assert training_length({"max_epochs": 4}, num_labeled=1) == 4


def test_single_network_method_is_ranked_by_entropy(tmp_path):
    """With a single-network method the score is the entropy; a broken scan is reported with its datastore path."""
    studies = make_datastore(tmp_path)
    conf = {**CONF, "method": "mean_teacher", "model_dir": str(tmp_path / "model"), "work_dir": str(tmp_path / "w")}
    settings = AppSettings.from_conf(conf)
    os.makedirs(settings.model_dir)  # a trained single-V-Net model: weights and the settings that rebuild its network
    trained = SoftmaxOutput(VNetSeg(out_channels=len(settings.labels), base_width=settings.base_width))
    torch.save(trained.state_dict(), settings.model_path)
    metadata = {
        **LEGACY_SETTINGS,
        "out_channels": len(settings.labels),
        "base_width": settings.base_width,
        "patch_size": list(settings.patch_size),
        "network": "SoftmaxOutput",
        "network_def": network_config(trained),
    }
    write_model_settings(metadata, os.path.join(settings.model_dir, SETTINGS_FILE))  # fmt: skip
    network = settings.inference_parser().get_parsed_content("network_def")
    assert isinstance(network, SoftmaxOutput) and isinstance(network.net, VNetSeg)
    images = {name: str(studies / f"{name}.nii.gz") for name in UNLABELED[:2] + [BROKEN]}
    rows, failures = rank_images(settings, images, str(tmp_path / "scoring"))
    assert sorted(rows) == UNLABELED[:2] and {row["ranked_by"] for row in rows.values()} == {"entropy"}
    scores = image_scores(rows[UNLABELED[0]], timestamp=1.0)
    assert scores[SCORE] == pytest.approx(rows[UNLABELED[0]]["entropy"]) and scores[DISAGREEMENT] is None
    assert list(failures) == [BROKEN] and failures[BROKEN].startswith(images[BROKEN])


def train_and_wait(server, request: dict, timeout: float = 600) -> None:
    """POST ``/train/<model>`` with ``request`` and poll ``/train/`` until the task is DONE (else fail with the log)."""
    response = requests.post(f"{server.url}/train/{MODEL}", json=request, timeout=30)
    assert response.status_code == 200, response.text
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = requests.get(f"{server.url}/train/", timeout=30).json()
        if task["status"] in ("DONE", "ERROR"):
            break
        time.sleep(2.0)
    assert task["status"] == "DONE", f"{task}\n{server.tail()}"


def test_monailabel_server_end_to_end(tmp_path):
    studies = make_datastore(tmp_path)
    server = Server(studies, tmp_path)
    try:
        server.wait_ready()
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        assert MODEL in info["models"] and MODEL in info["trainers"] and STRATEGY in info["strategies"]
        assert info["models"][MODEL]["labels"] == {"lesion": 1}
        assert info["labels"] == {"lesion": 1}

        # before any training: a clear answer, the server up
        response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": UNLABELED[0]}, timeout=60)
        assert response.status_code == 422 and "no trained model yet" in response.text

        # training on the datastore, length from the request
        before = data_files()
        train_and_wait(server, {"max_epochs": 2})
        stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"][MODEL]
        assert stats["iterations"] == 2 * 2  # 2 epochs of ceil(3 labeled / batch 2) iterations
        assert (stats["labeled"], stats["unlabeled"]) == (3, 5)
        assert len(stats["left_out"]) == 1 and f"{BROKEN}.nii.gz" in stats["left_out"][0]
        trained_on = json.loads((tmp_path / "work" / "train" / "data" / "dataset.json").read_text())["training"]
        assert sorted(Path(i["image"]).name for i in trained_on if "label" not in i) == [
            f"{n}.nii.gz" for n in UNLABELED
        ]
        assert data_files() == before
        model = tmp_path / "model" / "model.pt"
        assert model.is_file()

        # inference with the trained weights: the image's grid
        mask, params = infer(server, UNLABELED[1])
        assert params["model_timestamp"] == model.stat().st_mtime
        assert mask.shape == (32, 32, 32)
        np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

        # a second training: the next /infer reloads the new weights
        stamp = model.stat().st_mtime
        train_and_wait(server, {"max_iterations": 3})
        assert model.stat().st_mtime != stamp
        assert requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"][MODEL]["iterations"] == 3
        mask, params = infer(server, UNLABELED[1])
        assert params["model_timestamp"] == model.stat().st_mtime != stamp and mask.shape == (32, 32, 32)

        # next sample: the highest disagreement, as configs/rank.json ranks the same images with the same weights
        response = requests.post(f"{server.url}/activelearning/{STRATEGY}", json={}, timeout=300)
        assert response.status_code == 200, response.text
        sample = response.json()
        ranking = rank_with_bundle(model, studies, tmp_path / "rank")
        top = min(ranking, key=lambda scan: int(ranking[scan]["rank"]))
        assert sample["id"] == top and sample["ranked_by"] == "disagreement"
        assert sample["score"] == pytest.approx(float(ranking[top]["disagreement"]), rel=1e-4, abs=1e-6)
        assert list(sample["skipped"]) == [BROKEN] and f"{BROKEN}.nii.gz" in sample["skipped"][BROKEN]

        # the broken image: reported, the server still up
        response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": BROKEN}, timeout=60)
        assert response.status_code == 422 and f"{BROKEN}.nii.gz" in response.text
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
        assert server.process.poll() is None
    except Exception:
        print(server.tail(200))
        raise
    finally:
        server.stop()
