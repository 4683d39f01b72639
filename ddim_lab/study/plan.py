"""Stage 1 of a run: plan the grid.

1. the grid points of a job: guidance × start step × target prompt (:func:`plan_points`);
2. the rows of an image group: every (image, grid point), image-major, each with the prompt it samples with,
   whether it is an edit, its trajectory's seed and the artifact slot it samples from (:class:`Grid`);
3. the job's image groups: the images whose trajectories share one batch (:func:`image_groups`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ddim_lab.data.folders import Item
from ddim_lab.data.pie import PieItem
from ddim_lab.study.records import part_name


@dataclass(frozen=True)
class GridPoint:
    """One sampling configuration applied to every image."""

    guidance: float
    start_step: int
    target: str | None  # edit prompt; None reconstructs with the image's own prompt
    from_item: bool = False  # edit to each image's own target prompt (PIE-Bench data)

    @property
    def label(self) -> str:
        what = "target" if self.from_item else "recon" if self.target is None else self.target
        return f"g={self.guidance:g} k={self.start_step} {what}"


@dataclass(frozen=True)
class GridSpec:
    """The grid settings of a reconstruct/edit job (the config's ``task``, ``edit_prompt``,
    ``guidance_scale``, ``start_step`` as lists, and ``seed``)."""

    task: str
    edit_prompts: tuple[Any, ...]
    guidances: tuple[Any, ...]
    start_steps: tuple[Any, ...]
    seed: int = 0


def plan_points(spec: GridSpec, item_targets: bool = False) -> list[GridPoint]:
    """The product guidance × start step × target of one job; ``item_targets``: an edit without
    ``edit_prompt`` on annotated data edits each image to its own target prompt."""
    targets = list(spec.edit_prompts) if spec.task == "edit" else [None]
    own = item_targets and spec.task == "edit" and not targets
    return [
        GridPoint(float(g), int(k), t, from_item=own)
        for t, g, k in itertools.product(targets or [None], spec.guidances, spec.start_steps)
    ]


@dataclass(frozen=True)
class Grid:
    """The planned grid of a run: its points, the run's seed, and whether each image has one artifact per
    sampling guidance (``per_guidance``: guidance-dependent inverters, ``inversion.guidance_scale=match``)
    or one for all (stored under guidance None)."""

    points: tuple[GridPoint, ...]
    seed: int
    per_guidance: bool

    def rows(self, images: int) -> list[tuple[int, int, GridPoint]]:
        """(image index, point index, point) of every trajectory of ``images`` images, image-major."""
        return [(i, j, p) for i, (j, p) in itertools.product(range(images), enumerate(self.points))]

    def slots(self) -> list[float | None]:
        """The sampling guidances the artifacts of one image serve (``[None]``: one artifact serves all)."""
        return sorted({p.guidance for p in self.points}) if self.per_guidance else [None]

    def slot(self, point: GridPoint) -> float | None:
        """The slot of the artifact a trajectory of ``point`` samples from."""
        return point.guidance if self.per_guidance else None

    @staticmethod
    def target(item: Item, point: GridPoint) -> str | None:
        """The prompt a trajectory samples with when it is an edit (None: reconstruction)."""
        if point.from_item:
            return item.target_prompt if isinstance(item, PieItem) else None
        return point.target

    def prompt(self, item: Item, point: GridPoint) -> str:
        """The prompt a trajectory samples with: the edit's target, else the image's own prompt."""
        return self.target(item, point) or item.prompt

    def is_edit(self, item: Item, point: GridPoint) -> bool:
        target = self.target(item, point)
        return target is not None and target != item.prompt

    def sample_seed(self, image_index: int, point_index: int) -> int:
        """The seed of one stochastic trajectory: distinct per (image, grid point), stable across groups."""
        return int(self.seed) + image_index * len(self.points) + point_index


@dataclass(frozen=True)
class ImageGroup:
    """Images whose trajectories share network calls; ``name``: the part its rows are saved as."""

    index: int
    first: int  # the first image's position in the data set
    items: list[Item]
    name: str


def image_groups(items: Sequence[Item], batch_size: int, points: int) -> list[ImageGroup]:
    """The job's image groups: ``batch_size // points`` images each (at least one), in data set order, each
    named after what it holds (image name, content and prompt), so a rerun finds the parts already saved."""
    size = max(1, batch_size // points)
    keys = [f"{it.name}\t{getattr(it, 'content_hash', '')}\t{it.prompt}" for it in items]
    return [
        ImageGroup(n, first, list(items[first : first + size]), part_name(n, keys[first : first + size]))
        for n, first in enumerate(range(0, len(items), size))
    ]
