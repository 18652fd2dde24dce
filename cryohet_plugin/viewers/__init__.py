"""cryohet viewers: latent space, FSC curves, volume series (ChimeraX). Figures come from ``plots``."""
from .viewers import CryohetFlexViewer, CryohetResultsViewer, PngView

__all__ = ["CryohetFlexViewer", "CryohetResultsViewer", "PngView"]
