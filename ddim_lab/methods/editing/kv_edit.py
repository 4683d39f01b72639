"""KV-Edit's preserved background keys and values (Zhu et al., ICCV 2025, "KV-Edit: Training-Free Image
Editing for Precise Background Preservation", arXiv:2502.17363; reference: Xilluill/KV-Edit,
``models/kv_edit.py::Flux_kv_edit``, ``flux/sampling.py::denoise_kv``, ``flux/modules/layers.py::
DoubleStreamBlock_kv`` / ``SingleStreamBlock_kv``, defaults in ``gradio_kv_edit.py``), on the injection
contract (``ddim_lab.methods.editing.injection``): each edit is sampled beside its source's reconstruction.

With an edit region M (1 = edit, the foreground) on the latent grid and its token mask (a token is foreground
when any latent pixel of its patch is, the reference's ``mask.sum(dim=2) > 0.5``), at every evaluation of a
pair, in every attention of every block (FLUX's double- and single-stream blocks, SD3's joint blocks):

    1. K, V of the target's background image tokens := its source's           (the reference's cached K/V;
       the target keeps its own text keys and values and its foreground's)
    2. logits of the target's queries on background image keys += ``attn_scale``  (``create_attention_scale``)
    3. the target's prediction outside M := its source's                        (``denoise_kv``'s latent blend)

The reference denoises the foreground tokens only (queries of text and foreground, keys over text and the
whole image); here the target computes every token, but its background tokens reach the others only through
their keys and values (1.), and its background latents are its source's at every step (3.; the samplers step
per pixel), so its foreground and text compute the reference's function and its final latent is the
reference's ``z0 · (1 − M) + x · M`` with the source's final latent as ``z0``.

Deviations, stated: the reference caches K/V and latents during its inversion (keyed by the step's upper
level, so it reads features of the inversion's evaluation one level below, and starts from the inversion's
latent one level below the top: commit 77129a2); here they come from the source's sampling evaluation at
the same level, as ``rf_edit`` takes its values. ``re_init`` (a fresh noised start) and ``attn_mask`` (a
foreground/background split during the inversion) are not built: their defaults are off. ``skip_step``
(4 of 28) is the grid's ``start_step``.

The mask (``mask``): ``data`` takes the data's edit mask (PIE-Bench's; ``EditPrompts.masks``), bilinear to
the latent grid and any positive value foreground (the reference's); that makes the mask an input, so the
rows' protocol carries ``mask_use="input"``. ``derived``, for data without masks: at the pair's first
evaluation (no injection yet) M = the min-max-normalised mean |v_t − v_s| per token (UniEdit-Flow's region
map, ``uni_edit.region_mask``) > ``threshold``, DiffEdit's rule (Couairon et al., ICLR 2023: the two
prompts' predictions differenced, normalised, thresholded at 0.5) on the pair's own first evaluation; blended
from there on. A mask from attention maps is not built: the changed tokens of SD3's three text encoders and
FLUX's T5 do not align simply. ``auto``: the data's where it has one, else derived.

Identical prompts: with a derived mask (empty) or ``attn_scale=0`` the edit is the reconstruction exactly;
with ``attn_scale > 0`` and a data mask it is the reconstruction outside the mask, and the bias re-weights
the attention inside it (as the reference's does). Cost: a target and a source trajectory per edit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ddim_lab.engine.ddim import Denoiser, Prediction, predict
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.flow import velocity
from ddim_lab.engine.schedule import Plan
from ddim_lab.engine.token_fold import FoldedJointAttnProcessor, can_fold, folded_attention
from ddim_lab.methods.editing.base import Editor, EditPrompts, WrappingDenoiser
from ddim_lab.methods.editing.injection import (
    PAIR,
    ROLE,
    Injection,
    Layout,
    flow_transformer,
    hooked,
    paired_cost,
    sample_paired,
)
from ddim_lab.methods.editing.pairs import SOURCE, TARGET
from ddim_lab.methods.editing.uni_edit import region_mask
from ddim_lab.methods.inversion.base import Cost, Inverter, SampleRows

MASK = "kv_mask"  # cond.extra: (B, h, w) float in {0, 1}, the data's edit region on the latent grid
MASKS = ("auto", "data", "derived")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, R, R) image-resolution masks → (B, h, w) {0, 1} on the latent grid: bilinear, then any positive
    value is foreground (the reference's ``F.interpolate(..., 'bilinear'); mask[mask > 0] = 1``)."""
    small = F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, h, w)
    return (small > 0).float()


def token_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(n, h, w) latent masks → (n, h/p · w/p) bool foreground tokens, row-major (FLUX's packing, SD3's patch
    embedding): a token is foreground when any latent pixel of its p×p patch is."""
    return (F.max_pool2d(mask.float()[:, None], patch) > 0).flatten(1)


def derived_mask(v_t: torch.Tensor, v_s: torch.Tensor, threshold: float) -> torch.Tensor:
    """(n, C, h, w) target and source velocities → (n, h, w) {0, 1}: normalised per-token |Δ| > threshold
    (empty where the prompts agree: the map is 0/0 there)."""
    m = torch.nan_to_num(region_mask(v_t - v_s), nan=0.0)  # (n, 1, h, w) in [0, 1]
    return (m[:, 0] > threshold).float()


class Region:
    """The masks one sampling call shares: each pair's derived mask, and the current call's background tokens
    of the layout's targets (None: nothing to inject in this call)."""

    def __init__(self) -> None:
        self.derived: dict[int, torch.Tensor] = {}  # pair id → (h, w)
        self.background: torch.Tensor | None = None  # (m, T_image) bool, aligned with the layout's targets


class PreservingDenoiser(WrappingDenoiser):
    """``base`` inside the injection layout: sets the call's background tokens for the hooks (1., 2.), then
    blends each target's prediction with its source's outside the pair's mask (3.)."""

    def __init__(
        self, base: Denoiser, control: Injection, region: Region, patch: int, threshold: float
    ) -> None:
        self.base, self.control, self.region = base, control, region
        self.patch, self.threshold = patch, threshold

    def masks(self, cond: Conditioning, rows: list[int]) -> list[torch.Tensor | None]:
        """Each row's (h, w) mask: the data's, else its pair's derived one (None before its first call)."""
        if MASK in cond.extra:
            return [cond.extra[MASK][r] for r in rows]
        pair = cond.extra[PAIR].cpu()
        return [self.region.derived.get(int(pair[r])) for r in rows]

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        lay: Layout | None = self.control.layout
        if lay is None:
            return predict(self.base, x, t, cond)
        role, pair = cond.extra[ROLE].cpu(), cond.extra[PAIR].cpu()
        source = {int(pair[r]): r for r in range(len(cond)) if role[r] == SOURCE}
        targets = [r for r in range(len(cond)) if role[r] == TARGET]
        entries = self.masks(cond, lay.cond_rows.tolist())  # (h, w) per layout entry, None: not known yet
        known = torch.tensor([m is not None for m in entries], device=x.device)
        fore = torch.stack([torch.ones(x.shape[-2:]) if m is None else m.cpu() for m in entries]).to(x.device)
        self.region.background = ~token_mask(fore, self.patch) & known[:, None]  # (m, T_image)
        try:
            pred = predict(self.base, x, t, cond)  # steps 1–2 in the hooks
        finally:
            self.region.background = None
        eps, x0 = pred.eps.clone(), pred.x0.clone()
        for r, m in zip(targets, self.masks(cond, targets), strict=True):
            s = source[int(pair[r])]
            if m is None:  # derived mode, the pair's first evaluation
                v = velocity(pred)
                m = derived_mask(v[r : r + 1], v[s : s + 1], self.threshold)[0]
                self.region.derived[int(pair[r])] = m
            keep = m.to(x.device).bool()[None]  # (1, h, w) foreground
            eps[r], x0[r] = torch.where(keep, eps[r], eps[s]), torch.where(keep, x0[r], x0[s])  # step 3
        return Prediction(eps, x0)


def attentions(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block's attention: FLUX's double- and single-stream, SD3's joint (and SD3.5's image-only)."""
    blocks = [
        *getattr(transformer, "transformer_blocks", []),
        *getattr(transformer, "single_transformer_blocks", []),
    ]
    return [a for b in blocks for a in (getattr(b, "attn", None), getattr(b, "attn2", None)) if a is not None]


@dataclass
class KVEdit(Editor):
    """editor=kv_edit: the target's background keys and values are its source's, in every attention."""

    attn_scale: float = 1.0  # logit bias on background keys (reference: ``attn_scale`` slider, default 1)
    mask: str = "auto"  # one of MASKS: the data's edit mask, one derived from the prompts, or auto
    threshold: float = 0.5  # derived masks: normalised |v_t − v_s| above this is foreground

    name: ClassVar[str] = "kv_edit"
    flow_only: ClassVar[bool] = True

    def check(self) -> None:
        if self.mask not in MASKS:
            raise ValueError(f"editor=kv_edit: mask={self.mask!r} must be one of {', '.join(MASKS)}")
        value = self.attn_scale
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"editor=kv_edit: attn_scale={value!r} must be a number >= 0")
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"editor=kv_edit: threshold={value!r} must be a fraction in [0, 1)")

    @property
    def uses_data_mask(self) -> bool:
        return self.mask in ("auto", "data")

    @property
    def requires_data_mask(self) -> bool:
        """``mask=data``: data without edit masks cannot run (no fallback); checked before any model loads."""
        return self.mask == "data"

    def trajectory_cost(self, inverter: Inverter, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        """An edit costs its target and its source trajectory."""
        return paired_cost(inverter, plan, start, guidance, edit)

    def with_masks(self, rows: SampleRows, prompts: EditPrompts, size: tuple[int, int]) -> SampleRows:
        """``rows`` with the data's masks in ``cond.extra`` (they follow the rows through pairing and chunks),
        where the mode takes them; one clear line where ``mask=data`` finds none."""
        masks = prompts.masks or [None] * len(rows.start)
        have = all(m is not None for m in masks)
        if self.mask == "data" and not have:
            raise ValueError("editor=kv_edit mask=data: the data gives no edit mask; use editor.mask=derived")
        if self.mask == "derived" or not have:
            return rows
        grid = latent_mask(torch.stack([m.reshape(1, *m.shape[-2:]) for m in masks]), size)
        grid = grid.to(rows.cond.text.device)
        cond, source = (replace(c, extra={**c.extra, MASK: grid}) for c in (rows.cond, rows.source))
        return replace(rows, cond=cond, source=source)  # pairing picks each row from either

    @contextmanager
    def attached(
        self, transformer: torch.nn.Module, family: str, control: Injection, region: Region
    ) -> Iterator:
        """Steps 1–2: K/V overwrite hooks on every attention's image projections, the key-bias pre-hooks,
        and on SD3 a joint attention that honours the bias (``token_fold``'s unfolded processor)."""
        attns = attentions(transformer)

        def select(lay: Layout, output: torch.Tensor) -> torch.Tensor | None:
            bg = region.background  # (m, N)
            if bg is None:
                return None
            return F.pad(bg, (output.shape[1] - bg.shape[1], 0))  # FLUX single blocks: text tokens first

        def bias(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            bg, lay = region.background, control.layout
            if bg is None or lay is None or not self.attn_scale or not bool(bg.any()):
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            context = kwargs.get("encoder_hidden_states")
            b, keys = hidden.shape[0], hidden.shape[1] + (0 if context is None else context.shape[1])
            at = keys - bg.shape[1] if family == "flux" else 0  # FLUX: [text; image] keys, SD3: [image; text]
            out = torch.zeros(b, keys, device=hidden.device, dtype=hidden.dtype)
            out[lay.target.to(hidden.device), at : at + bg.shape[1]] = float(self.attn_scale) * bg.to(out.dtype)
            return args, {**kwargs, "attention_mask": out[:, None, None, :]}  # (b, 1, 1, keys)

        joint = [b.attn for b in getattr(transformer, "transformer_blocks", [])]
        with ExitStack() as stack:
            modules = [p for a in attns for p in (a.to_k, a.to_v)]
            stack.enter_context(hooked(modules, control, select))
            if family == "sd3" and self.attn_scale:  # the stock joint attention ignores attention_mask
                if not can_fold(transformer):
                    raise ValueError(
                        "editor=kv_edit attn_scale>0 on SD3 needs diffusers' stock joint attention processors;"
                        " this transformer runs others: set editor.attn_scale=0"
                    )
                stack.enter_context(folded_attention(transformer, FoldedJointAttnProcessor()))
            handles = [
                a.register_forward_pre_hook(bias, with_kwargs=True)
                for a in (joint if family == "sd3" else attns)
            ]
            stack.callback(lambda: [h.remove() for h in handles])
            yield

    def sample(
        self,
        inverter: Inverter,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        prompts: EditPrompts,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        transformer = flow_transformer(denoiser, self.name)
        if not bool(rows.edit.any()):
            return inverter.sample(denoiser, plan, rows, eta=eta, batch_size=batch_size, progress=progress)
        family = denoiser.family
        patch = 2 if family == "flux" else int(transformer.config.patch_size)  # FLUX packs 2×2 latent patches
        size = tuple(next(iter(rows.artifact.values())).shape[-2:])  # (h, w) latent grid
        region = Region()

        def wrap(base: Denoiser, control: Injection) -> Denoiser:
            return PreservingDenoiser(base, control, region, patch, float(self.threshold))

        def attach(control: Injection) -> Any:
            return self.attached(transformer, family, control, region)

        rows = self.with_masks(rows, prompts, size)
        out, _, take = sample_paired(inverter, denoiser, plan, rows, attach, eta, batch_size, progress, wrap)
        return out[take.to(out.device)]
