"""Loss terms of the dual-network method, one ``nn.Module`` per term (see each class for its equation)."""

from bundle.losses.consistency import CosineConsistencyLoss, MaskedConsistencyLoss
from bundle.losses.prototype import PrototypeContrastiveLoss
from bundle.losses.pseudo import CrossPseudoSupervisionLoss, EntropyFilteredLoss, UncertaintyRectifiedLoss
from bundle.losses.ramps import contrastive_ramp, sigmoid_rampup
from bundle.losses.supervised import SupervisedLoss

__all__ = [
    "CosineConsistencyLoss",
    "CrossPseudoSupervisionLoss",
    "EntropyFilteredLoss",
    "MaskedConsistencyLoss",
    "PrototypeContrastiveLoss",
    "SupervisedLoss",
    "UncertaintyRectifiedLoss",
    "contrastive_ramp",
    "sigmoid_rampup",
]
