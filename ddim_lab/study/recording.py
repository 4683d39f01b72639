"""Stage 5 of a run: record.

1. an image group's result rows (``ddim_lab.schema``: settings, scores, costs by formula, time, memory) and
   the columns of its grid (input, VAE round trip, control image, one column per grid point);
2. the run's summary (``run.json``): passes spent against the minimum, time, memory, protocol; merged over
   the processes of a job;
3. a job's image-group bookkeeping: where each group's grid goes, the contact sheet, failed groups.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ddim_lab import schema
from ddim_lab.config.budget import RowPoint, row_cost
from ddim_lab.data.folders import Item
from ddim_lab.data.pie import PieItem
from ddim_lab.data.scoring import Scorer, scorer_summary
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing import Editor
from ddim_lab.methods.inversion.base import Artifact, Cost, Inverter
from ddim_lab.study.accounting import Tally, peak_memory_mb
from ddim_lab.study.artifacts import InversionSettings, Slot
from ddim_lab.study.plan import Grid
from ddim_lab.study.protocol import Protocol
from ddim_lab.study.records import VAE_COLUMN, parts_dir, stack_grids
from ddim_lab.study.scoring import GroupScores, RoundTrip

log = logging.getLogger(__name__)

GROUP_ERRORS = "group_errors.jsonl"
SHEET = "grid_sheet.png"  # a job's contact sheet: every image group's grid rows under one header


@dataclass(frozen=True)
class GroupResult:
    """What an image group produced: its inputs' round trip, artifacts and their costs, scored results, and
    the seconds per row and peak memory it took."""

    items: list[Item]
    first_index: int  # the first item's position in the data set
    inputs: RoundTrip
    artifacts: dict[Slot, Artifact]
    costs: dict[Slot, tuple[Cost, bool]]
    scores: GroupScores
    seconds: float
    memory: float


class Recorder:
    """Rows, grid columns and summary of a run of ``inverter`` on ``plan`` over ``grid``; ``shared``: the
    run-wide config columns (``schema.config_values``), ``knobs_json``: every knob of the inverter."""

    def __init__(
        self,
        grid: Grid,
        inverter: Inverter,
        plan: Plan,
        inversion: InversionSettings,
        shared: dict[str, Any],
        knobs_json: str,
        stochastic: bool,  # eta > 0 or a noise-drawing editor: rows name their trajectory's seed
    ) -> None:
        self.grid, self.inverter, self.plan, self.inversion = grid, inverter, plan, inversion
        self.shared, self.knobs_json, self.stochastic = shared, knobs_json, stochastic

    def rows(
        self,
        group: GroupResult,
        editor: Editor,
        cost_guidance: Callable[[float], float],
        protocol: Protocol | None,
    ) -> list[dict]:
        """One result row per (image, grid point) of ``group``, image-major."""
        grid, items, scores = self.grid, group.items, group.scores.scores
        vae_scores = group.inputs.vae_scores
        rows = []
        for r, (i, j, p) in enumerate(grid.rows(len(items))):
            cost, cached = group.costs[i, grid.slot(p)]
            edit = grid.is_edit(items[i], p)
            inversion_guidance = self.inversion.guidance_for(p.guidance)
            rows.append(
                schema.row(
                    **{k: v for k, v in self.shared.items() if p.seed is None or k != "seed"},
                    image=items[i].name,
                    prompt=items[i].prompt,
                    edit_prompt=grid.target(items[i], p) or "",  # empty = reconstruction, as the README says
                    inverter_knobs=self.knobs_json,
                    inversion_guidance_scale=inversion_guidance,
                    guidance_scale=p.guidance,
                    start_step=p.start_step,
                    psnr=float(scores["psnr"][r]),
                    ssim=float(scores["ssim"][r]),
                    lpips=float(scores["lpips"][r]),
                    latent_mse=float(group.scores.latent_err[r]),
                    vae_psnr=float(vae_scores["psnr"][i]),
                    vae_lpips=float(vae_scores["lpips"][i]),
                    unet_evals=editor.charged(
                        self.inverter, self.plan, p.start_step, p.guidance, edit, cost_guidance
                    ).forwards,
                    **editor.row_fields(),
                    inversion_unet_evals=cost.forwards,
                    inversion_unet_backwards=cost.backwards,
                    inversion_cached=cached,
                    nfe=row_cost(
                        self.inverter,
                        editor,
                        self.plan,
                        group.artifacts[i, grid.slot(p)],
                        RowPoint(p.guidance, inversion_guidance, p.start_step, edit),
                        cost_guidance,
                    ).forwards,
                    sample_seed=grid.sample_seed(group.first_index + i, j) if self.stochastic else None,
                    **({} if p.seed is None else {"seed": p.seed}),  # a replicate of a seed list
                    seconds=group.seconds,
                    peak_memory_mb=group.memory,
                    protocol=None if protocol is None else protocol.id(),
                    **{k: v[r] for k, v in group.scores.edit_scores.items()},
                )
            )
        return rows

    def columns(self, group: GroupResult, controls: tuple[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The grid's columns: input, VAE round trip, the control image (``controls``: its header and images),
        then each grid point's results."""
        columns = {"input": group.inputs.images, VAE_COLUMN: group.inputs.vae_images}
        if controls is not None:
            columns[controls[0]] = controls[1]
        P = len(self.grid.points)
        for j, p in enumerate(self.grid.points):
            columns[p.label] = group.scores.results[j::P]
        return columns

    def summary(
        self,
        tally: Tally,
        editor: Editor,
        protocol: Protocol | None,
        scorers: list[Scorer],
        images: int,
        device: torch.device,
    ) -> dict[str, Any]:
        """run.json: network passes spent against the inverter's minimum, time and memory."""
        extra = {}
        if protocol is not None:  # annotated data: its protocol and the scorers' counts (empty regions)
            extra = {"protocol": protocol.fields(), **scorer_summary(scorers)}
        return {
            **extra,
            **tally.evals,
            "inverter": self.inverter.name,
            "inverter_knobs": asdict(self.inverter),
            "formula": self.inverter.formula,
            "editor": {"name": editor.name, **editor.knobs()},
            "unet_evals": tally.evals["inversion"] + tally.evals["sampling"],
            "unet_backwards": tally.evals["inversion_backwards"],
            "minimum_unet_evals": tally.minimum.forwards,
            "minimum_unet_backwards": tally.minimum.backwards,
            "images": images,
            "grid_points": len(self.grid.points),
            "seconds": time.perf_counter() - tally.started,
            "peak_memory_mb": peak_memory_mb(device),
        }


def protocol_for(
    items: list[Item], benchmark: str, resolution: int, lpips_net: str, mask_use: str = "score-only"
) -> Protocol | None:
    """The evaluation protocol of a run on annotated (PIE-Bench-format) data: what makes its numbers
    comparable (``mask_use="input"`` when the editor is given the data's masks); None for other data."""
    if not items or not all(isinstance(it, PieItem) for it in items):
        return None
    return Protocol.for_images(
        [it.name for it in items],
        benchmark=benchmark,
        resolution=resolution,
        lpips_net=lpips_net,
        mask_use=mask_use,
    )


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The first process's summary, its counts added up over the other processes' (``grid_points`` kept)."""
    summary = summaries[0]
    for other in summaries[1:]:
        for key, value in other.items():
            if isinstance(value, int) and not isinstance(value, bool) and key != "grid_points":
                summary[key] = summary.get(key, 0) + value
    return summary


# -- a job's image groups ------------------------------------------------------------------------------------
def group_grid_path(run_dir: Path, n: int, part: str, grids: str) -> Path:
    """Where image group ``n`` (part ``part``) saves its grid: ``grid_NNN.png`` with ``grids=groups``, else
    beside its rows in ``parts/`` (what the contact sheet is made of)."""
    return run_dir / f"grid_{n:03d}.png" if grids == "groups" else parts_dir(run_dir) / f"{part}.png"


def existing_grid(run_dir: Path, n: int, part: str) -> Path | None:
    """Image group ``n``'s saved grid, wherever an attempt with either ``grids`` setting put it."""
    paths = [group_grid_path(run_dir, n, part, grids) for grids in ("groups", "sheet")]
    return next((p for p in paths if p.exists()), None)


def contact_sheet(run_dir: Path, grids: list[Path | None], logger: Any, sheet: str = SHEET) -> None:
    """``grid_sheet.png``: the groups' grids under one header (as many as a viewable picture holds), mirrored
    to the logger; kept as it is when some group's grid is missing."""
    if not grids or any(g is None for g in grids):
        log.warning("no contact sheet: %d of %d image groups have no saved grid", grids.count(None), len(grids))
        return
    made = stack_grids(grids, run_dir / sheet)
    if made is None:
        return
    path, shown, total = made
    if shown < total:
        log.info("%s shows the first %d of %d images; each group's grid: %s, …", sheet, shown, total, grids[0])
    logger.log_image(path, f"contact sheet: {shown} of {total} images")


def record_group_failure(
    run_dir: Path, n: int, part: list[Item], err: BaseException, errors: str = GROUP_ERRORS
) -> None:
    """Log one failed image group and append it to ``run_dir/group_errors.jsonl``; free GPU memory."""
    entry = {"group": n, "images": [it.name for it in part], "type": type(err).__name__, "message": str(err)}
    log.error("image group %d (%s) failed: %s: %s", n, ", ".join(entry["images"][:3]), entry["type"], err)
    with (run_dir / errors).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job's image groups: how many groups have their rows saved (a rerun does the rest)."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted after {done} of {total} image groups; rerun the same command to resume")
        self.done, self.total = done, total


class GroupsFailed(RuntimeError):
    """Some image groups of a job failed; the others' rows are saved."""


def groups_failed(
    run_dir: Path, failed: int, total: int | None = None, saved: int | None = None, errors: str = GROUP_ERRORS
) -> GroupsFailed:
    """The error a job ends with when ``failed`` of its ``total`` image groups failed (``saved`` rows saved);
    without ``total``, what another process than the main one says."""
    where = run_dir / errors
    if total is None:
        return GroupsFailed(f"{failed} image group(s) failed; see {where}")
    return GroupsFailed(
        f"{failed} of {total} image group(s) failed ({saved} rows saved); see {where}; rerun the same command"
        " to retry them"
    )
