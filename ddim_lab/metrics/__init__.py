"""Image measures: PSNR / SSIM / LPIPS against the input (``image``) and the editing measures of PIE-Bench
(``edit``: masked fidelity, CLIP and DINO)."""
