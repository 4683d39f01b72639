"""Time ``ddim-lab-report`` with intervals on 10,000 synthetic rows (two inverters × steps × images).

    python scripts/benchmark_report.py [--rows 10000] [--figures] [--html] [--grids] [--keep DIR]

Writes one run directory per (inverter, num_steps) like a Hydra multirun, then times the full report (tables
with bootstrap intervals, paired comparisons; figures and the page when asked) read from those saved tables.
``--grids`` also saves each run's image-group grids as the engine does (16-px tiles, 8 images per group; not
timed), so the page draws its default grid from them; the page's size is printed.

Measured 2026-11-27 on 2 shared CPU cores (load average about 6), 10,000 rows, 2000 resamples: tables only
2.8 s; with ``--figures --html`` 5.2 s; the whole ``ddim-lab-report DIR --figures --html --images ...`` process
(Python start and imports included) 5.9 s. Re-measured 2026-12-03 on a quiet machine (load average 0.8),
``--figures --html``, three runs: 4.64, 2.92, 2.61 s (the first with cold file caches). Target: under 10 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

INVERTERS = ("ddim", "null_text")
STEPS = (10, 25, 50, 100, 200)


def synthetic_rows(images: int, steps=STEPS, inverters=INVERTERS, seed: int = 0) -> pd.DataFrame:
    """Rows in the result schema: PSNR grows with steps, null_text beats ddim by about 2 dB per image."""
    from ddim_lab.study.records import results_frame

    rng = np.random.default_rng(seed)
    image_effect = rng.normal(0, 2, images)
    vae = 30 + rng.normal(0, 0.5, images)
    rows = []
    for inv_i, inverter in enumerate(inverters):
        for n in steps:
            psnr = 20 + 2 * np.log(n) + 2 * inv_i + image_effect + rng.normal(0, 1, images)
            for i in range(images):
                rows.append(
                    {
                        "image": f"img{i:05d}.png",
                        "prompt": f"a handwritten digit {i % 10}",
                        "task": "reconstruct",
                        "model": "digits",
                        "scheduler": "ddim",
                        "inverter": inverter,
                        "num_steps": n,
                        "inversion_guidance_scale": 1.0,
                        "guidance_scale": 1.0,
                        "start_step": 0,
                        "eta": 0.0,
                        "seed": 0,
                        "dtype": "fp32",
                        "psnr": float(psnr[i]),
                        "ssim": float(np.clip(0.5 + psnr[i] / 100, 0, 1)),
                        "lpips": float(np.exp(-psnr[i] / 10)),
                        "lpips_net": "alex",
                        "latent_mse": float(np.exp(-psnr[i] / 5)),
                        "vae_psnr": float(vae[i]),
                        "unet_evals": n,
                        "inversion_unet_evals": n,
                        "inversion_unet_backwards": 0,
                        "seconds": 0.01 * n,
                    }
                )
    return results_frame(rows)


def write_runs(df: pd.DataFrame, root: Path, grids: bool = False, group: int = 8) -> None:
    """One run directory per (inverter, num_steps); ``grids``: each run's image groups' grids too."""
    from ddim_lab.study.records import write_results

    for j, (_, rows) in enumerate(df.groupby(["inverter", "num_steps"], sort=True)):
        write_results(rows.to_dict("records"), root / str(j))
        if grids:
            write_grids(rows, root / str(j), group)


def write_grids(rows: pd.DataFrame, run_dir: Path, group: int) -> None:
    """``grid_NNN.png`` per group of ``group`` images: input | VAE round-trip | the run's one grid point."""
    import torch

    from ddim_lab.study.records import save_grid

    images = list(dict.fromkeys(rows["image"]))
    for n, first in enumerate(range(0, len(images), group)):
        part = images[first : first + group]
        tiles = torch.rand(len(part), 3, 16, 16, generator=torch.Generator().manual_seed(first))
        columns = [("input", tiles), ("VAE round-trip", tiles), ("g=1 k=0 recon", tiles.flip(-1))]
        save_grid(run_dir / f"grid_{n:03d}.png", columns, part)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--figures", action="store_true")
    parser.add_argument("--html", action="store_true")
    parser.add_argument("--grids", action="store_true", help="save each run's image grids (not timed)")
    parser.add_argument("--keep", type=Path, default=None, help="write the runs and report here (kept)")
    args = parser.parse_args(argv)

    from ddim_lab.report.main import main as report_main

    images = max(1, args.rows // (len(INVERTERS) * len(STEPS)))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        write_runs(synthetic_rows(images), root, grids=args.grids)
        flags = [*(["--figures"] if args.figures else []), *(["--html"] if args.html else [])]
        start = time.perf_counter()
        code = report_main([str(root), *flags])
        seconds = time.perf_counter() - start
        page = root / "report.html"
        size = f", page {page.stat().st_size / 1024:.0f} KiB" if page.exists() else ""
        qual = sum(p.stat().st_size for p in root.glob("qual_*.png")) / 1024
        size += f" + grids {qual:.0f} KiB" if qual else ""
    rows = images * len(INVERTERS) * len(STEPS)
    print(f"report of {rows} rows ({' '.join(flags) or 'tables only'}): {seconds:.2f} s{size}, exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
