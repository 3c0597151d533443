"""fusionkit-xattn: a cross-modal transformer fusion and a gated late-fusion gate for fusionkit."""

from fusionkit_xattn.fusion import XAttnFusion, XAttnParams
from fusionkit_xattn.gate import GatedLateFusion, GatedLateParams

__version__ = "0.1.0"

__all__ = ["GatedLateFusion", "GatedLateParams", "XAttnFusion", "XAttnParams", "__version__"]
