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
from typing import Any, ClassVar

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
    seed: int | None = None  # the replicate's seed (``seed=[0,1,2]``); None: the run's one seed

    @property
    def label(self) -> str:
        what = "target" if self.from_item else "recon" if self.target is None else self.target
        seed = "" if self.seed is None else f" s={self.seed}"
        return f"g={self.guidance:g} k={self.start_step} {what}{seed}"


@dataclass(frozen=True)
class GridSpec:
    """The grid settings of a reconstruct/edit job (the config's ``task``, ``edit_prompt``,
    ``guidance_scale``, ``start_step`` as lists, and ``seed``: the first of ``seeds``, the replicate seeds of a
    seed list; one seed leaves ``seeds`` empty)."""

    task: str
    edit_prompts: tuple[Any, ...]
    guidances: tuple[Any, ...]
    start_steps: tuple[Any, ...]
    seed: int = 0
    seeds: tuple[int, ...] = ()


def plan_points(spec: GridSpec, item_targets: bool = False) -> list[GridPoint]:
    """The product seed × target × guidance × start step of one job (seed: the replicates of a seed list,
    outermost); ``item_targets``: an edit without ``edit_prompt`` on annotated data edits each image to its
    own target prompt."""
    targets = list(spec.edit_prompts) if spec.task == "edit" else [None]
    own = item_targets and spec.task == "edit" and not targets
    seeds: list[int | None] = [int(s) for s in spec.seeds] or [None]
    return [
        GridPoint(float(g), int(k), t, from_item=own, seed=s)
        for s, t, g, k in itertools.product(seeds, targets or [None], spec.guidances, spec.start_steps)
    ]


@dataclass(frozen=True)
class Grid:
    """The planned grid of a run: its points, the run's seed, whether each image has one artifact per
    sampling guidance (``per_guidance``: guidance-dependent inverters, ``inversion.guidance_scale=match``)
    or one for all (stored under guidance None), and whether it has one per replicate seed (``per_seed``: a
    stochastic inverter under a seed list; its slots are then (guidance slot, seed))."""

    points: tuple[GridPoint, ...]
    seed: int
    per_guidance: bool
    per_seed: bool = False
    replicate_stride: ClassVar[int] = 1_000_003  # replicate seeds' trajectory seeds never meet

    def rows(self, images: int) -> list[tuple[int, int, GridPoint]]:
        """(image index, point index, point) of every trajectory of ``images`` images, image-major."""
        return [(i, j, p) for i, (j, p) in itertools.product(range(images), enumerate(self.points))]

    def slots(self) -> list[Any]:
        """The slots of one image's artifacts, each a sampling guidance it serves (None: every guidance), and
        with ``per_seed`` a (guidance slot, seed) pair; ``[None]``: one artifact serves all."""
        return list(dict.fromkeys(self.slot(p) for p in sorted(self.points, key=_slot_order)))

    def slot(self, point: GridPoint) -> Any:
        """The slot of the artifact a trajectory of ``point`` samples from."""
        guidance = point.guidance if self.per_guidance else None
        return (guidance, self.point_seed(point)) if self.per_seed else guidance

    def point_seed(self, point: GridPoint) -> int:
        """The seed a trajectory of ``point`` draws from: its replicate's, else the run's."""
        return self.seed if point.seed is None else int(point.seed)

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
        """The seed of one stochastic trajectory: distinct per (image, grid point), stable across groups; a
        replicate seed s offsets it by s · 1 000 003 (distinct while images × points < 1 000 003)."""
        offset = image_index * len(self.points) + point_index
        point = self.points[point_index]
        if point.seed is None:
            return int(self.seed) + offset
        return (int(point.seed) * self.replicate_stride + offset) % 2**63


def _slot_order(point: GridPoint) -> tuple[int, float]:
    return (-1 if point.seed is None else int(point.seed), point.guidance)


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
