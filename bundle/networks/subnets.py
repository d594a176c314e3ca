"""The two subnets of the dual-network method and the inference wrappers (two-net ensemble, single-net softmax).

Both subnets share one decoder design (``AdditiveSkipDecoder``) and differ in their encoders:

* :class:`ResNet34Seg` (Subnet A): 3D ResNet-34 encoder (BasicBlocks ``[3, 4, 6, 3]``), 17,930,354 parameters for
  ``in_channels=1, out_channels=2, base_width=16``.
* :class:`VNetSeg` (Subnet B): the plain-convolution V-Net of UA-MT/MCF (blocks of 1, 2, 3, 3, 3 convolutions),
  9,448,866 parameters for the same arguments.

Feature maps, for an input of shape ``(N, in_channels, H, W, D)`` and ``f = base_width``: ``s1`` (f, full size),
``s2`` (2f, /2), ``s3`` (4f, /4), ``s4`` (8f, /8), ``s5`` (16f, /16). ``H, W, D`` must be divisible by 16.

``forward(x)`` returns the logits ``(N, out_channels, H, W, D)`` only (TorchScript-able);
``forward_features(x)`` also returns the decoder features ``x9`` ``(N, f, H, W, D)`` after dropout, which the
prototype loss uses. See docs/methods/dual_network.md §1.

``activation_checkpointing=True`` keeps only the inputs of the full- and half-resolution stages (encoder stem and
first stage, last two decoder stages) during a training forward and recomputes their insides in backward
(:func:`checkpoint_keeping_buffers`): the same outputs, gradients and BatchNorm statistics; for the dual-network batch
of 2+2 at 112x112x80 the tensors kept for backward drop from 7.4 to 2.7 GiB, for about 18 % more compute per step.
"""

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, Union

import torch
from monai.networks.layers.utils import get_norm_layer
from torch import nn
from torch.utils.checkpoint import checkpoint

from bundle.networks.described import DescribedNetwork

#: a MONAI norm spec: ``"batch"``, ``"instance"`` or a ``(name, kwargs)`` tuple, e.g. ``("group", {"num_groups": 8})``.
NormSpec = Union[str, Tuple[str, Dict]]

#: total down-sampling factor of both encoders; every spatial size must be a multiple of it.
SIZE_DIVISOR = 16


def check_spatial_shape(x: torch.Tensor, divisor: int = SIZE_DIVISOR) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(N, C, H, W, D)`` with ``H, W, D`` divisible by ``divisor``."""
    if x.dim() != 5:
        raise ValueError(f"expected a 5D input (N, C, H, W, D), got shape {list(x.shape)}")
    for size in x.shape[2:]:
        if size % divisor != 0:
            raise ValueError(
                f"spatial sizes must be divisible by {divisor}, got input shape {list(x.shape)}; "
                "pad or crop the input (the sliding-window ROI must also be a multiple of 16)"
            )


@contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Put ``module``'s buffers (BatchNorm running statistics and batch counters) back as they were on entry."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def checkpoint_keeping_buffers(module: nn.Module, function: Callable[..., Any], *inputs: torch.Tensor) -> Any:
    """``function(*inputs)`` through ``torch.utils.checkpoint`` (non-reentrant): only ``inputs`` are kept for backward,
    which reruns ``function``. The rerun would update ``module``'s BatchNorm running statistics a second time (torch's
    checkpoint does not prevent it), so it runs inside :func:`buffers_restored`; outputs, gradients, buffers and
    dropout masks (RNG state replayed) equal those of a plain forward."""
    return checkpoint(
        function, *inputs, use_reentrant=False, context_fn=lambda: (nullcontext(), buffers_restored(module))
    )


class CheckpointableSequential(nn.Sequential):
    """``nn.Sequential`` (same state-dict keys) that recomputes its activations in backward when
    ``checkpoint_activations`` is set, the module is training and gradients are enabled; plain otherwise (eval,
    ``no_grad`` teachers, TorchScript)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.checkpoint_activations = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return self._forward_checkpointed(x)
        for layer in self:
            x = layer(x)
        return x

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_keeping_buffers(self, super().forward, x)


def conv_norm_relu(
    in_channels: int, out_channels: int, norm: NormSpec, kernel_size: int = 3, stride: int = 1, bias: bool = True
) -> CheckpointableSequential:
    """``Conv3d(kernel_size, stride, 'same' padding for stride 1) + norm + ReLU``."""
    padding = (kernel_size - 1) // 2 if stride == 1 else 0
    return CheckpointableSequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias),
        get_norm_layer(norm, spatial_dims=3, channels=out_channels),
        nn.ReLU(inplace=True),
    )


def conv_stack(in_channels: int, out_channels: int, num_convs: int, norm: NormSpec) -> CheckpointableSequential:
    """``num_convs`` times ``Conv3d(3^3, bias) + norm + ReLU``; the first maps ``in_channels -> out_channels``."""
    return CheckpointableSequential(
        *[conv_norm_relu(in_channels if i == 0 else out_channels, out_channels, norm) for i in range(num_convs)]
    )


#: the weight initialisations an :class:`EncoderDecoderSeg` offers: ``"kaiming_normal"`` (:func:`init_weights`, the
#: dual-network authors' choice) or ``"torch_default"`` (PyTorch's own per-layer initialisation, Kaiming-uniform with
#: ``a = sqrt(5)``, which UA-MT's released V-Net keeps: its ``__init_weight`` call is commented out).
WEIGHT_INITS = ("kaiming_normal", "torch_default")


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal on every Conv3d/ConvTranspose3d weight; norm-layer weight (gamma) 1 and bias (beta) 0.

    Convolution biases keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class UpBlock(nn.Module):
    """One decoder stage: ``block(ReLU(norm(ConvT_{k2,s2}(x))) + skip)``; the skip is **added**, not concatenated.

    Input ``x``: ``(N, in_channels, h, w, d)``; ``skip``: ``(N, in_channels // 2, 2h, 2w, 2d)``; output like ``skip``.
    With ``checkpoint_activations`` set, a training forward keeps only ``x`` and ``skip`` for backward.
    """

    def __init__(self, in_channels: int, num_convs: int, norm: NormSpec) -> None:
        super().__init__()
        self.checkpoint_activations = False
        out_channels = in_channels // 2
        self.up = nn.Sequential(
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
            get_norm_layer(norm, spatial_dims=3, channels=out_channels),
            nn.ReLU(inplace=True),
        )
        self.block = conv_stack(out_channels, out_channels, num_convs, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tap(x, skip)[1]

    def forward_with_tap(self, x: torch.Tensor, skip: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(u, block(u))`` with ``u = ReLU(norm(ConvT(x))) + skip``, the tap DuCiSC reads (shape of ``skip``)."""
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return self._forward_checkpointed(x, skip)
        return self._tap_and_output(x, skip)

    def _tap_and_output(self, x: torch.Tensor, skip: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tap = self.up(x) + skip
        return tap, self.block(tap)

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor, skip: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return checkpoint_keeping_buffers(self, self._tap_and_output, x, skip)


class AdditiveSkipDecoder(nn.Module):
    """Decoder shared by both subnets (docs/methods/dual_network.md §1): four :class:`UpBlock` with 3, 3, 2, 1
    convolutions.

    ``forward(skips)`` takes ``[s1, s2, s3, s4, s5]`` (widths ``f, 2f, 4f, 8f, 16f``) and returns ``x9``
    ``(N, f, H, W, D)`` after ``Dropout3d(dropout)`` (active in training mode only).
    """

    def __init__(self, base_width: int, norm: NormSpec, dropout: float) -> None:
        super().__init__()
        widths = [16 * base_width, 8 * base_width, 4 * base_width, 2 * base_width]
        self.stages = nn.ModuleList([UpBlock(w, n, norm) for w, n in zip(widths, (3, 3, 2, 1))])
        self.dropout = nn.Dropout3d(dropout)

    def forward(self, skips: List[torch.Tensor]) -> torch.Tensor:
        x = skips[4]
        for i, stage in enumerate(self.stages):
            x = stage(x, skips[3 - i])
        return self.dropout(x)


class BasicBlock(nn.Module):
    """ResNet BasicBlock: ``ReLU(BN(conv3(ReLU(BN(conv3_s(x))))) + shortcut(x))``, convolutions without bias.

    The shortcut is a ``1^3`` stride-``stride`` convolution + norm when the shape changes, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormSpec) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = get_norm_layer(norm, spatial_dims=3, channels=out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = get_norm_layer(norm, spatial_dims=3, channels=out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                get_norm_layer(norm, spatial_dims=3, channels=out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet34Encoder(nn.Module):
    """3D ResNet-34 encoder: ``7^3`` stride-1 stem (no bias) + norm + ReLU -> ``s1``, no max-pool, then four stages
    of ``[3, 4, 6, 3]`` BasicBlocks at widths ``2f, 4f, 8f, 16f``, each starting with stride 2 -> ``s2 .. s5``."""

    def __init__(self, in_channels: int, base_width: int, norm: NormSpec, blocks: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = conv_norm_relu(in_channels, base_width, norm, kernel_size=7, bias=False)
        stages = []
        width = base_width
        for i, num_blocks in enumerate(blocks):
            out_width = base_width * 2 ** (i + 1)
            stages.append(
                CheckpointableSequential(
                    *[
                        BasicBlock(width if b == 0 else out_width, out_width, 2 if b == 0 else 1, norm)
                        for b in range(num_blocks)
                    ]
                )
            )
            width = out_width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


class VNetEncoder(nn.Module):
    """Plain-convolution V-Net encoder: ``s1`` = 1 conv at width ``f``; then four stages of
    ``Conv(k2, s2) + norm + ReLU`` (doubling the width) followed by 2, 3, 3, 3 convolutions -> ``s2 .. s5``;
    ``Dropout3d(dropout)`` on the bottleneck ``s5`` (training mode only)."""

    def __init__(self, in_channels: int, base_width: int, norm: NormSpec, dropout: float) -> None:
        super().__init__()
        self.stem = conv_stack(in_channels, base_width, 1, norm)
        stages = []
        for i, num_convs in enumerate((2, 3, 3, 3)):
            width = base_width * 2**i
            stages.append(
                CheckpointableSequential(
                    conv_norm_relu(width, 2 * width, norm, kernel_size=2, stride=2),
                    conv_stack(2 * width, 2 * width, num_convs, norm),
                )
            )
        self.stages = nn.ModuleList(stages)
        self.bottleneck_dropout = nn.Dropout3d(dropout)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        features[-1] = self.bottleneck_dropout(features[-1])
        return features


class EncoderDecoderSeg(DescribedNetwork):
    """Encoder + :class:`AdditiveSkipDecoder` + ``1^3`` convolution head; the common body of both subnets.

    Subclasses choose the encoder (:meth:`build_encoder`), a module mapping ``(N, in_channels, H, W, D)`` to
    ``[s1, .., s5]`` of widths ``f .. 16f``.

    Args:
        in_channels: image channels.
        out_channels: number of classes ``C >= 2``.
        base_width: ``f``, the width of ``s1`` and of the decoder features.
        norm: MONAI norm spec.
        dropout: ``Dropout3d`` probability on the decoder features ``x9`` (and wherever the encoder puts it).
        activation_checkpointing: see :meth:`set_activation_checkpointing`.
        weight_init: one of :data:`WEIGHT_INITS`. With BatchNorm after every convolution the forward does not depend
            on the weights' scale, but the step does: Kaiming-normal weights are sqrt(6) times larger than PyTorch's
            default ones, so the same SGD learning rate moves them less relative to their size and a short
            schedule fits the labeled data more slowly (docs/RESULTS.md, "Choosing settings on a validation split").
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        base_width: int = 16,
        norm: NormSpec = "batch",
        dropout: float = 0.5,
        activation_checkpointing: bool = False,
        weight_init: str = "kaiming_normal",
    ) -> None:
        super().__init__()
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {list(WEIGHT_INITS)}, got {weight_init!r}.")
        encoder = self.build_encoder(in_channels, base_width, norm, dropout)
        if out_channels < 2:
            raise ValueError(f"out_channels must be >= 2 (softmax over classes), got {out_channels}.")
        self.encoder = encoder
        self.decoder = AdditiveSkipDecoder(base_width, norm, dropout)
        self.head = nn.Conv3d(base_width, out_channels, kernel_size=1)
        self.weight_init = weight_init
        self.initialise(self)
        self.set_activation_checkpointing(activation_checkpointing)

    def initialise(self, module: nn.Module) -> None:
        """Apply this network's ``weight_init`` to ``module`` (itself, or layers a subclass adds, e.g. heads):
        :func:`init_weights` for ``kaiming_normal``; nothing for ``torch_default`` (the layers keep PyTorch's draw)."""
        if self.weight_init == "kaiming_normal":
            init_weights(module)

    def build_encoder(self, in_channels: int, base_width: int, norm: NormSpec, dropout: float) -> nn.Module:
        """The encoder of the subclass (:class:`ResNet34Seg`, :class:`VNetSeg`)."""
        raise NotImplementedError

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the full- and half-resolution stages in backward (``enabled``) or keep their activations.

        Those stages (``encoder.stem``, ``encoder.stages[0]``, ``decoder.stages[2:]``) hold most of a training
        forward's saved tensors, since a map at ``/2`` has 1/8 of the voxels of a full-resolution one; coarser stages
        are cheap to keep. Only training forwards with gradients are affected; the state dict is unchanged.
        """
        for stage in (self.encoder.stem, self.encoder.stages[0], self.decoder.stages[2], self.decoder.stages[3]):
            stage.checkpoint_activations = bool(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W, D)`` -> logits ``(N, out_channels, H, W, D)``."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N, in_channels, H, W, D)`` -> ``(logits (N, out_channels, H, W, D), x9 (N, base_width, H, W, D))``;
        ``x9`` is taken after the decoder dropout."""
        check_spatial_shape(x)
        features = self.decoder(self.encoder(x))
        return self.head(features), features


class ResNet34Seg(EncoderDecoderSeg):
    """Subnet A: :class:`ResNet34Encoder` + shared decoder; dropout only on the decoder features ``x9``.

    17,930,354 parameters for ``in_channels=1, out_channels=2, base_width=16, norm="batch"``.
    """

    def build_encoder(self, in_channels: int, base_width: int, norm: NormSpec, dropout: float) -> nn.Module:
        """:class:`ResNet34Encoder` (no dropout in the encoder)."""
        return ResNet34Encoder(in_channels, base_width, norm)


class VNetSeg(EncoderDecoderSeg):
    """Subnet B: :class:`VNetEncoder` + shared decoder; ``Dropout3d(dropout)`` on the bottleneck and on ``x9``.

    9,448,866 parameters for ``in_channels=1, out_channels=2, base_width=16, norm="batch"``.
    """

    def build_encoder(self, in_channels: int, base_width: int, norm: NormSpec, dropout: float) -> nn.Module:
        """:class:`VNetEncoder` with ``Dropout3d(dropout)`` on its bottleneck."""
        return VNetEncoder(in_channels, base_width, norm, dropout)


class SoftmaxEnsemble(DescribedNetwork):
    """Inference network: the mean of the two subnets' softmax probabilities (docs/methods/dual_network.md §1).

    ``forward(x)``: ``(N, in_channels, H, W, D)`` -> ``(N, C, H, W, D)`` probabilities summing to 1 over ``C``, in
    fp32 also under autocast (the logits are cast before the softmax). Its state dict keys are ``net_a.*`` and
    ``net_b.*`` (the layout of ``models/model.pt``).
    """

    def __init__(self, net_a: nn.Module, net_b: nn.Module) -> None:
        super().__init__()
        self.net_a = net_a
        self.net_b = net_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.softmax(self.net_a(x).float(), dim=1) + torch.softmax(self.net_b(x).float(), dim=1))


class SoftmaxOutput(DescribedNetwork):
    """Inference network of a single-network method (the baselines' student, or one CPS branch): its softmax.

    ``forward(x)``: ``(N, in_channels, H, W, D)`` -> ``(N, C, H, W, D)`` fp32 probabilities ``softmax_C(net(x))``,
    the same kind of output as :class:`SoftmaxEnsemble`. Its state dict keys are ``net.*`` (the layout of
    ``models/model.pt`` for such methods).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).float(), dim=1)
