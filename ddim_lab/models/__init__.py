"""Model loading and construction: Stable Diffusion from the hub or disk, the shipped digits model, `tiny`."""
