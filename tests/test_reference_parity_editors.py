"""Reference parity of the editors whose reference is plain guided sampling (p2p has its own transcription:
tests/test_reference_parity_p2p.py).

``prompt_swap`` is the DDIM edit of the prompt-to-prompt and null-text notebooks: the source image is inverted
with its own prompt (``NullInversion.ddim_loop``) and sampled back with the target prompt from the start
step's latent (``text2image_ldm_stable``), both transcribed in ``tests/references/null_text_w_ptp.py``. The
lab runs the same edit through ``make_editor("prompt_swap").sample`` on the shipped digits model (float32);
max |Δ| ≤ 1e-4 × the latents' scale, as for the inverters (tests/test_reference_parity_ddim_family.py).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ddim_lab.data.folders import load_dataset
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.methods.editing import EditPrompts, make_editor
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.models.latent import LatentModel
from tests.conftest import DIGITS
from tests.references import null_text_w_ptp as ptp

N = 8
RTOL = 1e-4  # max |Δ| ≤ RTOL × max |reference|: float32 rounding
TARGET = "a handwritten digit seven"


def edit_setup(model: LatentModel, num_steps: int = N) -> dict:
    """Two held-out digits of different classes, their source and target embeddings, the lab's DDIM
    artifact and plan, and the reference's pivot ``ddim_loop`` (B, N+1, C, h, w) with its scheduler."""
    items = load_dataset(DIGITS, model.resolution, "")[:4:2]
    x0 = model.encode(torch.stack([it.image for it in items]))  # (2, 4, 8, 8)
    text, B = model.embed([it.prompt for it in items]), len(items)
    null, target = model.embed([""] * B), model.embed([TARGET] * B)
    inverter = make_inverter("ddim")
    scheduler = model.scheduler()
    plan, denoiser = inverter.plan(scheduler, num_steps), model.denoiser(scheduler)
    artifact = inverter.invert(denoiser, x0, plan, Conditioning(text, null, torch.ones(B)), InvertContext())
    reference = DDIMScheduler.from_config(model.pipe.scheduler.config)  # the notebooks' own scheduler object
    reference.set_timesteps(num_steps)
    pivot = torch.stack(ptp.ddim_loop(model.pipe.unet, reference, x0, text), dim=1)
    return {
        "prompts": [it.prompt for it in items],
        "text": text,
        "null": null,
        "target": target,
        "inverter": inverter,
        "plan": plan,
        "denoiser": denoiser,
        "artifact": artifact,
        "reference": reference,
        "pivot": pivot,
    }


def edit_rows(setup: dict, guidance: float, start: int) -> tuple[SampleRows, EditPrompts]:
    """Every image edited to ``TARGET`` at ``guidance`` from ``start``: the engine's rows and prompts."""
    B = len(setup["text"])
    g = torch.full((B,), float(guidance))
    rows = SampleRows(
        setup["artifact"],
        Conditioning(setup["target"], setup["null"], g),
        Conditioning(setup["text"], setup["null"], g),
        torch.full((B,), start),
        torch.ones(B, dtype=torch.bool),
    )
    return rows, EditPrompts(source=setup["prompts"], target=[TARGET] * B, blended=[None] * B)


def reference_edit(model: LatentModel, setup: dict, guidance: float, start: int) -> torch.Tensor:
    """The notebooks' DDIM edit: ``text2image`` with the target prompt over the last N − k timesteps, from
    the pivot's latent there."""
    steps = setup["plan"].num_steps - start
    latent = setup["pivot"][:, steps]
    return ptp.text2image(
        model.pipe.unet, setup["reference"], latent, setup["target"], setup["null"], guidance, steps
    )


def assert_parity(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    delta, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    assert delta <= RTOL * scale, f"{what}: max |Δ| = {delta:.3e} > {RTOL:g} × {scale:.3f}"


def test_prompt_swap_matches_the_notebooks_ddim_edit(digits):
    setup = edit_setup(digits)
    assert_parity("ddim pivot", setup["artifact"]["trajectory"], setup["pivot"])  # the same starting latents
    editor = make_editor("prompt_swap")
    for guidance, start in ((1.0, 0), (7.5, 3)):
        rows, prompts = edit_rows(setup, guidance, start)
        ours = editor.sample(setup["inverter"], setup["denoiser"], setup["plan"], rows, prompts)
        theirs = reference_edit(digits, setup, guidance, start)
        assert_parity(f"prompt_swap g={guidance} k={start}", ours, theirs)
