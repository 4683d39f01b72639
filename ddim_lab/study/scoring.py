"""Stage 4 of a run: decode and score.

1. before inverting, each input's VAE round trip: encode (posterior mean) → x0, decode, score against the
   input (:func:`round_trip`; the row's ``vae_*`` columns, the floor every reconstruction sits on);
2. after sampling, check the final latents are finite, decode them and score each against its input (PSNR,
   SSIM, LPIPS), its latent against x0 (``latent_mse``), and each row by the data set's scorers
   (``data.scorers``, ``ddim_lab.data.scoring``) (:func:`decode_and_score`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddim_lab.data.folders import Item
from ddim_lab.data.scoring import ScoreBatch, Scorer, score_rows
from ddim_lab.metrics.image import ImageMetrics, mse
from ddim_lab.models.latent import LatentModel
from ddim_lab.study.plan import Grid


class NonFiniteResult(RuntimeError):
    """Sampling produced NaN or infinite latents for an image group."""


@dataclass(frozen=True)
class RoundTrip:
    """An image group's inputs and their VAE round trip."""

    images: torch.Tensor  # (G, 3, R, R) in [0, 1]
    x0: torch.Tensor  # (G, C, h, w): the encoder's posterior mean
    vae_images: torch.Tensor  # (G, 3, R, R): x0 decoded
    vae_scores: dict[str, torch.Tensor]  # metric → (G,): the round trip against the input


@dataclass(frozen=True)
class GroupScores:
    """A group's decoded results and their scores, rows image-major (G·P)."""

    results: torch.Tensor  # (G·P, 3, R, R) in [0, 1]
    scores: dict[str, torch.Tensor]  # psnr, ssim, lpips → (G·P,) against the row's input
    latent_err: torch.Tensor  # (G·P,): per-element MSE of the final latent against x0
    edit_scores: dict[str, list]  # the data set's scorers' columns


def round_trip(model: LatentModel, metrics: ImageMetrics, items: list[Item]) -> RoundTrip:
    """Encode ``items``' images, decode them again and score the round trip."""
    images = torch.stack([it.image for it in items])  # (G, 3, R, R) in [0, 1]
    x0 = model.encode(images)  # (G, C, h, w)
    vae_images = model.decode(x0)
    return RoundTrip(images, x0, vae_images, metrics(vae_images, images))


def check_finite(out: torch.Tensor, items: list[Item], points: int) -> None:
    """Raise NonFiniteResult naming the images whose final latents (G·P, C, h, w) hold NaN or inf."""
    if bool(torch.isfinite(out).all()):
        return
    bad_rows = (~torch.isfinite(out)).flatten(1).any(1).nonzero().flatten().tolist()
    bad = sorted({items[r // points].name for r in bad_rows})
    raise NonFiniteResult(f"sampling gave NaN/inf latents for {', '.join(bad)}")


def decode_and_score(
    model: LatentModel,
    metrics: ImageMetrics,
    scorers: list[Scorer],
    grid: Grid,
    items: list[Item],
    inputs: RoundTrip,
    out: torch.Tensor,
) -> GroupScores:
    """Decode the final latents ``out`` (G·P, C, h, w) of ``grid``'s rows of ``items`` and score them."""
    P = len(grid.points)
    check_finite(out, items, P)
    results = model.decode(out)  # (G·P, 3, R, R)
    scores = metrics(results, inputs.images.repeat_interleave(P, dim=0))
    latent_err = mse(out.cpu(), inputs.x0.cpu().repeat_interleave(P, dim=0))
    rows = grid.rows(len(items))
    batch = ScoreBatch(  # each row's result, input, item, target prompt and whether it is an edit
        results=results,
        prompts=[grid.prompt(items[i], p) for i, _, p in rows],
        sources=inputs.images.repeat_interleave(P, dim=0),
        items=[items[i] for i, _, _ in rows],
        edits=[grid.is_edit(items[i], p) for i, _, p in rows],
    )
    return GroupScores(results, scores, latent_err, score_rows(scorers, batch))
