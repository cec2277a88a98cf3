"""An example genbench family in its own package: `PixelGMM`, registered as `pixel-gmm`."""
from genbench_pixelgmm.model import PixelGMM

__all__ = ["PixelGMM"]
