"""Stage 2 of a run: each image's inversion artifact, from the cache when possible, else inverted.

1. name each artifact by its cache key: everything that determines it and nothing else (:meth:`Artifacts.key`;
   the model's part is :func:`model_identity`);
2. load what the cache holds; invert the rest of the group in one batch and save it;
3. null-text's DDIM pivot (``InvertContext.pivot``) the same way, memoised for the group: it depends on the
   image and the inversion guidance only, so it is computed at most once per image and inversion guidance;
4. every artifact at its formula cost (flagged cached when loaded); what was computed adds to the run's
   minimum (``accounting.Tally``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ddim_lab.config.schema import RuntimeSchema
from ddim_lab.data.folders import Item
from ddim_lab.engine.denoiser import UNetDenoiser
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.control.base import ControlSignal
from ddim_lab.methods.inversion.base import Artifact, Cost, InvertContext, Inverter
from ddim_lab.methods.inversion.ddim import DDIMInversion
from ddim_lab.models.latent import LatentModel
from ddim_lab.study.accounting import Tally
from ddim_lab.study.cache import InversionCache, inversion_key
from ddim_lab.study.conditioning import Conditioner

# model options that only label a model: what it computes never depends on them
DESCRIPTIVE_MODEL_KEYS = frozenset({"name"})

# (image index in its group, slot): the slot is the sampling guidance served (None: every guidance), or under a
# seed list with a stochastic inverter (guidance slot, replicate seed) (``plan.Grid.slot``)
Slot = tuple[int, Any]


def slot_parts(slot: Any) -> tuple[float | None, int | None]:
    """A slot as (sampling guidance or None, replicate seed or None: the run's seed)."""
    return tuple(slot) if isinstance(slot, tuple) else (slot, None)  # type: ignore[return-value]


@dataclass(frozen=True)
class InversionSettings:
    """What a run's artifacts depend on besides model, inverter and plan: ``num_steps``, the inversion
    guidance (``inversion.guidance_scale``; None for ``match``: each sampling guidance of the grid), the
    negative prompt and seed; and how to batch (``batch_size``) and report (``runtime.progress``)."""

    num_steps: int
    guidance: float | None
    negative_prompt: str
    seed: int
    batch_size: int
    progress: bool

    @property
    def match(self) -> bool:
        return self.guidance is None

    def guidance_for(self, sampling: float | None) -> float:
        """The guidance an artifact serving sampling guidance ``sampling`` is inverted at."""
        return float(sampling) if self.match else self.guidance


def model_identity(
    model: LatentModel,
    spec: Mapping[str, Any],
    runtime: RuntimeSchema,
    descriptive: frozenset[str] = DESCRIPTIVE_MODEL_KEYS,
) -> dict[str, Any]:
    """What determines the model's outputs: every option of the resolved model config ``spec`` except the
    ``descriptive`` ones (so a new option enters the cache key by itself: ``t5``, ``guidance``, ``resolution``,
    a built model's recipe, ...), the weights' revision (hub commit or file fingerprint), the runtime dtype
    and ``vae_fp32``."""
    return {
        "model": {k: v for k, v in spec.items() if k not in descriptive},
        "revision": model.revision,
        "dtype": runtime.dtype,
        "vae_fp32": runtime.vae_fp32,
    }


def control_identity(control: ControlSignal, controlnet: str, model: LatentModel) -> dict[str, Any]:
    """The ControlNet part of a conditioned run's cache keys: the signal and its knobs, the ControlNet's
    name, revision and scale."""
    return {
        "control": control.key(),
        "controlnet": controlnet,
        "controlnet_revision": model.controlnet_revision,
        "controlnet_scale": model.controlnet_scale,
    }


def image_seed(seed: int, item: Item) -> int:
    """The seed a stochastic inverter draws one image's noise from: the run's seed and the image's content,
    so images differ from each other and an image draws the same alone or in any batch."""
    return (int(seed) * 1_000_003 + int(item.content_hash[:12], 16)) % 2**63


class Artifacts:
    """The artifacts of ``inverter`` on ``plan`` (``scheduler_config``: the scheduler the plan came from),
    through ``cache``; ``identity``: the model's part of every key; the run's ``tally`` counts the work."""

    def __init__(
        self,
        inverter: Inverter,
        plan: Plan,
        scheduler_config: Mapping[str, Any],
        identity: Mapping[str, Any],
        settings: InversionSettings,
        cache: InversionCache,
        cond: Conditioner,
        tally: Tally,
    ) -> None:
        self.inverter, self.plan = inverter, plan
        self.scheduler_config = dict(scheduler_config)
        self.identity = dict(identity)
        self.settings, self.cache, self.cond, self.tally = settings, cache, cond, tally

    def key(
        self, item: Item, guidance: float | None = None, method: dict | None = None, seed: int | None = None
    ) -> str:
        """The cache key of ``item``'s artifact (or, with ``method``, of its DDIM pivot) serving sampling
        guidance ``guidance`` (``seed``: a replicate's, else the run's): everything that determines it and
        nothing else."""
        inverter = self.inverter if method is None else DDIMInversion()
        fields: dict[str, Any] = {
            "image": item.content_hash,
            **self.identity,
            "scheduler": self.scheduler_config,
            "inverter": method or inverter.key(),
            "num_steps": self.settings.num_steps,
            "inversion_guidance": self.settings.guidance_for(guidance),
            "prompt": item.prompt,
            "negative_prompt": self.settings.negative_prompt,
        }
        if inverter.stochastic:
            fields["seed"] = int(self.settings.seed if seed is None else seed)
        if inverter.guidance_dependent and method is None:
            fields["guidance"] = float(guidance)
        return inversion_key(**fields)

    def _through_cache(
        self, keys: list[str], meta: Callable[[int], dict], compute: Callable[[list[int]], Artifact]
    ) -> tuple[list[Artifact], list[int]]:
        """The artifacts named by ``keys``: loaded from the cache, the missing ones computed in one batch by
        ``compute(todo)`` (a batched artifact, one row per index in ``todo``) and saved with ``meta(j)``.

        Returns the artifacts (rows without batch dim) and ``todo``, the indices that were computed.
        """
        found = [self.cache.load(k) for k in keys]
        todo = [j for j, a in enumerate(found) if a is None]
        if todo:
            art = compute(todo)
            for n, j in enumerate(todo):
                found[j] = {k: v[n].detach().cpu() for k, v in art.items()}
                self.cache.save(keys[j], found[j], meta(j))
        return found, todo

    def _pivot(
        self,
        items: list[Item],
        x0: torch.Tensor,
        guidance: float | None,
        spent: dict[int, Cost],
        memo: dict[str, Artifact],
        denoiser: UNetDenoiser,
        cost_guidance: Callable[[float], float],
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """rows → DDIM trajectories (b, M+1, C, h, w) of those items (null-text's pivot): from the group's
        ``memo`` (cache key → pivot), else through the cache, else computed.

        The pivot depends on the image and the inversion guidance only, so each is computed at most once per
        group, cache or not, however many sampling guidances ask for it; the minimum counts it once by formula.
        What computing a pivot cost is added to ``spent[row]`` (the artifact that first needed it).
        """
        inversion_guidance = self.settings.guidance_for(guidance)
        method = DDIMInversion()

        def pivot(rows: torch.Tensor) -> torch.Tensor:
            keys = [self.key(items[int(r)], guidance, method=method.key()) for r in rows]
            new = [j for j, key in enumerate(keys) if key not in memo]  # not yet met in this group
            new_rows = rows[new]  # (n,)
            new_items = [items[int(r)] for r in new_rows]

            def compute(todo: list[int]) -> Artifact:
                todo_items = [new_items[j] for j in todo]
                cond = self.cond([it.prompt for it in todo_items], [inversion_guidance] * len(todo), todo_items)
                ctx = InvertContext(batch_size=self.settings.batch_size, progress=self.settings.progress)
                return method.invert(denoiser, x0[new_rows[todo]], self.plan, cond, ctx)

            found, todo = self._through_cache(
                [keys[j] for j in new], lambda j: {"image": new_items[j].name, "pivot": True}, compute
            )
            memo.update({keys[j]: art for j, art in zip(new, found, strict=True)})
            one = method.inversion_cost(self.plan, {}, 1.0, cost_guidance(inversion_guidance))
            for j in todo:  # one per image and inversion guidance: the memo never lets a key come back here
                row = int(new_rows[j])
                spent[row] = spent.get(row, Cost()) + one
                self.tally.minimum += one
            self.tally.evals["pivots_computed"] += len(todo)
            return torch.stack([memo[key]["trajectory"] for key in keys]).to(x0.device)

        return pivot

    def _invert(
        self,
        items: list[Item],
        x0: torch.Tensor,
        g: float | None,
        pivot: Callable[[torch.Tensor], torch.Tensor],
        denoiser: UNetDenoiser,
        seed: int | None = None,
    ) -> Artifact:
        """The inverter's artifacts of ``items`` (x0 their latents) for sampling guidance ``g``, batched;
        a stochastic inverter draws from ``seed`` (a replicate's), else the run's seed."""
        seed = self.settings.seed if seed is None else seed
        ctx = InvertContext(
            guidance=1.0 if g is None else g,
            generators=[torch.Generator().manual_seed(image_seed(seed, it)) for it in items],
            batch_size=self.settings.batch_size,
            progress=self.settings.progress,
            pivot=pivot,
        )
        cond = self.cond([it.prompt for it in items], [self.settings.guidance_for(g)] * len(items), items)
        fwd, bwd = denoiser.unet_evals, denoiser.unet_backwards
        art = self.inverter.invert(denoiser, x0, self.plan, cond, ctx)
        self.tally.evals["inversion"] += denoiser.unet_evals - fwd
        self.tally.evals["inversion_backwards"] += denoiser.unet_backwards - bwd
        self.tally.evals["inversions_computed"] += len(items)
        return art

    def __call__(
        self,
        items: list[Item],
        x0: torch.Tensor,
        slots: Sequence[Any],
        denoiser: UNetDenoiser,
        cost_guidance: Callable[[float], float],
    ) -> tuple[dict[Slot, Artifact], dict[Slot, tuple[Cost, bool]]]:
        """Each image's artifact per sampling guidance in ``slots`` ({(i, g): artifact}; ``[None]``: one per
        image), and what it costs ({(i, g): (Cost, cached)}), the pivot this run computed for it included.

        A cached artifact is reported at its formula cost (what computing it costs), flagged cached; it adds
        nothing to the run's minimum.
        """
        pivots: dict[str, Artifact] = {}  # pivots are shared by the guidances of this group only
        found: dict[Slot, Artifact] = {}
        costs: dict[Slot, tuple[Cost, bool]] = {}
        for slot in slots:
            g, seed = slot_parts(slot)
            spent: dict[int, Cost] = {}  # pivot costs, by position in ``todo``

            def compute(todo: list[int], g: float | None = g, spent: dict = spent, seed=seed) -> Artifact:
                rows, latents = [items[i] for i in todo], x0[todo]
                pivot = self._pivot(rows, latents, g, spent, pivots, denoiser, cost_guidance)
                return self._invert(rows, latents, g, pivot, denoiser, seed)

            arts, todo = self._through_cache(
                [self.key(it, g, seed=seed) for it in items],
                lambda i: {"image": items[i].name, "prompt": items[i].prompt},
                compute,
            )
            self.tally.evals["inversions_cached"] += len(items) - len(todo)
            inverted_at = cost_guidance(self.settings.guidance_for(g))
            for i, art in enumerate(arts):  # every artifact at its formula cost; computed ones unflag below
                cost = self.inverter.inversion_cost(self.plan, art, 1.0 if g is None else g, inverted_at)
                found[i, slot], costs[i, slot] = art, (cost, True)
            for n, i in enumerate(todo):
                cost = costs[i, slot][0]
                self.tally.minimum += cost
                costs[i, slot] = (cost + spent.get(n, Cost()), False)
        return found, costs
