"""ddim_lab: DDIM sampling, inversion and editing studies on latent diffusion models."""

__version__ = "0.1.0"
