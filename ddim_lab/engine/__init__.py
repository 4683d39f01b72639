"""The DDIM math in one place: the plan (``schedule``), the DDIM step and loops (``ddim``), rectified flow as a
DDIM process (``flow``) and the denoiser adapters that put a UNet (``denoiser``) or an SD3/FLUX transformer
(``flow_denoiser``) behind one contract. Imports nothing else of the lab."""
