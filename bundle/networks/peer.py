"""Network variants of the peer methods (docs/methods/ducisc.md, docs/methods/dycon.md), built on :class:`VNetSeg`.

* :class:`DeepSupervisedVNet` (DuCiSC, docs/methods/ducisc.md): the V-Net with three extra ``1^3`` deep-supervision
  heads and the four decoder feature taps used for prototypes.
* :class:`ProjectionVNet` (DyCON's "VNet" backbone for LA, docs/methods/dycon.md): the V-Net plus a projection head on
  the bottleneck that yields one L2-normalisable embedding per ``8^3`` input block.

Both keep ``forward(x) -> logits (N, C, H, W, D)`` of the full-resolution head, so an inference wrapper
(:class:`~bundle.networks.subnets.SoftmaxOutput`) sees an ordinary segmentation network; the extra outputs come from
``forward_deep`` / ``forward_embedding``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from monai.networks.blocks import SimpleASPP
from monai.networks.layers.utils import get_norm_layer
from torch import nn
from torch.nn import functional as F

from bundle.networks.subnets import VNetSeg, check_spatial_shape


class DeepSupervisedVNet(VNetSeg):
    """V-Net with deep supervision (DuCiSC, docs/methods/ducisc.md): logits at four scales plus four decoder taps.

    With ``f = base_width`` and the decoder stage ``k`` computing ``u = ReLU(norm(ConvT(x))) + skip`` before its
    convolutions, the taps are (coarse to fine) ``u4`` ``(N, 8f, H/8, W/8, D/8)``, ``u3`` ``(N, 4f, H/4, ..)``,
    ``u2`` ``(N, 2f, H/2, ..)`` and ``u1`` ``(N, f, H, W, D)``. Heads: ``O^1 .. O^3`` are ``1^3`` convolutions on
    ``u4, u3, u2``; ``O^4`` is the main head on the last convolution stage after ``Dropout3d``. Level ``s`` pairs
    tap ``F^s`` with head ``O^s`` at the same resolution.

    ``forward(x)`` returns ``O^4`` only (inference uses the main head). Parameters: those of :class:`VNetSeg` plus
    ``3 (8f + 4f + 2f) C + 3 C`` for the heads.
    """

    def __init__(self, **vnet_args: Any) -> None:
        """``vnet_args``: those of :class:`~bundle.networks.subnets.VNetSeg`."""
        super().__init__(**vnet_args)
        base_width, out_channels = self.head.in_channels, self.head.out_channels
        self.ds_heads = nn.ModuleList(
            [nn.Conv3d(base_width * m, out_channels, kernel_size=1) for m in (8, 4, 2)]
        )  # on u4, u3, u2
        self.initialise(self.ds_heads)

    def forward_deep(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """``(N, in_channels, H, W, D)`` -> ``([O^1, O^2, O^3, O^4], [u4, u3, u2, u1])``, both coarse to fine."""
        check_spatial_shape(x)
        skips = self.encoder(x)
        out = skips[4]
        taps: List[torch.Tensor] = []
        for i, stage in enumerate(self.decoder.stages):
            tap, out = stage.forward_with_tap(out, skips[3 - i])
            taps.append(tap)
        logits = [head(tap) for head, tap in zip(self.ds_heads, taps[:3])]
        logits.append(self.head(self.decoder.dropout(out)))
        return logits, taps


class ProjectionHead(nn.Module):
    """DyCON's projection head (docs/methods/dycon.md): trilinear ``x upsample`` (align_corners True), then
    ``Conv 1^3 (in -> hidden) -> BN [-> ReLU] -> Conv 1^3 (hidden -> embed) [-> BN]``.

    ``variant="vnet"`` (the head of the released V-Net, used for LA): no ReLU and no final norm; ``"unet"`` (the 3D
    UNet head): ReLU and a final BatchNorm. Input ``(N, in, h, w, d)`` -> ``(N, embed, u h, u w, u d)``.
    """

    def __init__(
        self, in_channels: int, hidden_channels: int, embed_channels: int, upsample: int = 2, variant: str = "vnet"
    ) -> None:
        super().__init__()
        if variant not in ("vnet", "unet"):
            raise ValueError(f"projection head variant must be 'vnet' or 'unet', got {variant!r}.")
        self.upsample = int(upsample)
        layers: List[nn.Module] = [
            nn.Conv3d(in_channels, hidden_channels, kernel_size=1),
            get_norm_layer("batch", spatial_dims=3, channels=hidden_channels),
        ]
        if variant == "unet":
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv3d(hidden_channels, embed_channels, kernel_size=1))
        if variant == "unet":
            layers.append(get_norm_layer("batch", spatial_dims=3, channels=embed_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample != 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="trilinear", align_corners=True)
        return self.layers(x)


class ProjectionVNet(VNetSeg):
    """V-Net + DyCON projection head on the bottleneck (docs/methods/dycon.md, "DyCON (VNet)" of the LA table).

    The bottleneck ``s5`` ``(N, 16f, H/16, W/16, D/16)`` (after its ``Dropout3d``), optionally through an ASPP
    (MONAI :class:`~monai.networks.blocks.SimpleASPP`, branches ``1^3`` and ``3^3`` with dilations 6, 12, 18, BN +
    ReLU, then a ``1^3`` convolution back to ``16f``; unlike the released ASPP no global-pooling branch), goes
    through :class:`ProjectionHead` (upsample x2), giving one embedding per ``8^3`` input block: ``z``
    ``(N, embed_channels, H/8, W/8, D/8)`` (not normalised; the loss normalises).

    The released V-Net of DyCON is built without normalisation layers; here ``norm`` is the bundle's (BatchNorm by
    default), the same backbone as every other V-Net method of the benchmark.

    ``forward(x)`` returns the logits only; ``forward_embedding(x)`` returns ``(logits, z)`` from one pass.
    """

    def __init__(
        self,
        embed_channels: int = 256,
        hidden_channels: int = 512,
        head_variant: str = "vnet",
        use_aspp: bool = False,
        **vnet_args: Any,
    ) -> None:
        """``vnet_args``: those of :class:`~bundle.networks.subnets.VNetSeg`; the others: see
        :class:`ProjectionHead`."""
        super().__init__(**vnet_args)
        width = 16 * self.head.in_channels
        self.aspp: Optional[nn.Module] = None
        if use_aspp:
            self.aspp = nn.Sequential(
                SimpleASPP(3, width, width, kernel_sizes=(1, 3, 3, 3), dilations=(1, 6, 12, 18), acti_type="RELU"),
                nn.Conv3d(4 * width, width, kernel_size=1),
            )
        self.projection = ProjectionHead(width, hidden_channels, embed_channels, upsample=2, variant=head_variant)
        self.initialise(self.projection)

    def forward_embedding(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N, in_channels, H, W, D)`` -> ``(logits (N, C, H, W, D), z (N, embed_channels, H/8, W/8, D/8))``."""
        check_spatial_shape(x)
        skips = self.encoder(x)
        logits = self.head(self.decoder(skips))
        bottleneck = skips[4] if self.aspp is None else self.aspp(skips[4])
        return logits, self.projection(bottleneck)
