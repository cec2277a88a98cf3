"""genbench: GANs, VAEs, VQ-VAEs and diffusion models trained, sampled and scored side by side."""
__version__ = "0.1.0"
