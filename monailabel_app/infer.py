"""The infer task: the bundle's inference (``configs/inference.json``) behind MONAI Label's ``BasicInferTask``.

Preprocessing (RAS, z-score, the finite-voxel check), the sliding-window inferer and the postprocessing (``Invertd``
back to the input grid, argmax) are the bundle config's own components; MONAI Label's writer then saves the mask
with the input's affine. The network is reloaded whenever ``model.pt`` changes (after a training).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from fastapi import HTTPException
from monai.inferers import Inferer
from monai.transforms import Compose, SqueezeDimd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monailabel_app.settings import AppSettings

logger = logging.getLogger(__name__)

#: HTTP status of a request the server cannot serve for the data or model given (the server itself is fine).
UNPROCESSABLE = 422


def reason(err: BaseException) -> str:
    """An error's innermost cause on one line (MONAI wraps transform errors in ``RuntimeError``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class SSLInferTask(BasicInferTask):
    """Segments one image with the trained ``model.pt`` of :class:`AppSettings`.

    Listed in ``/info`` also before the first training (so that clients show its segments and can start a training);
    a request before then, or one whose image cannot be read, answers HTTP 422 with one line naming the file and
    the problem (never a ``SystemExit`` that would stop the server).
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.parser = settings.inference_parser()
        super().__init__(
            path=settings.model_path,
            network=self.parser.get_parsed_content("network_def"),
            type=InferType.SEGMENTATION,
            labels=settings.segment_labels,
            dimension=3,
            description=f"Semi-supervised segmentation ({settings.method} method), weights {settings.model_path}",
            load_strict=True,
        )
        self.preprocessing: Compose = self.parser.get_parsed_content("preprocessing")
        self.postprocessing: Compose = self.parser.get_parsed_content("postprocessing")

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data: Optional[Dict] = None) -> Sequence[Callable]:
        return list(self.preprocessing.transforms)

    def inferer(self, data: Optional[Dict] = None) -> Inferer:
        """The config's sliding-window inferer, its windows on the request's device."""
        device = (data or {}).get("device") or "cpu"
        self.parser["device"] = f"$torch.device('{device}')"
        self.parser.parse()
        return self.parser.get_parsed_content("inferer")

    def post_transforms(self, data: Optional[Dict] = None) -> Sequence[Callable]:
        return list(self.postprocessing.transforms) + [SqueezeDimd(keys="pred", dim=0)]

    def writer(self, data: Dict[str, Any], extension: Optional[str] = None, dtype: Any = None) -> Tuple[Any, Any]:
        """MONAI Label's writer, as uint8 class indices (``.nii.gz`` unless the request names an extension)."""
        return super().writer(data, extension=data.get("result_extension") or ".nii.gz", dtype=np.uint8)

    def _get_network(self, device: str, data: Optional[Dict]) -> torch.nn.Module:
        path = self.settings.model_path
        if not os.path.isfile(path):
            raise HTTPException(UNPROCESSABLE, f"Cannot segment: {path}: no trained model yet; run a training first.")
        try:
            network = super()._get_network(device, data)
        except Exception as err:  # truncated file, weights of another width or class count
            raise HTTPException(
                UNPROCESSABLE,
                f"Cannot segment: {path}: the weights do not fit the app's network (labels, base_width, method): "
                f"{reason(err)[:300]}",
            ) from err
        if data is not None:  # the result's params name the weights used: a client sees when a new model served
            data[self.output_json_key] = {"model": path, "model_timestamp": self._networks[device][1]}
        return network

    def __call__(self, request: Dict, callbacks: Any = None) -> Tuple[Any, Dict]:
        try:
            return super().__call__(request, callbacks)
        except HTTPException:
            raise
        except (Exception, SystemExit) as err:  # a bad image must not take the server down
            logger.error(f"Cannot segment {request.get('image')}: {reason(err)}")
            raise HTTPException(UNPROCESSABLE, f"Cannot segment {request.get('image')}: {reason(err)}") from err
