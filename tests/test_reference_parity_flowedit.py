"""Reference parity of ``flowedit`` on the shipped digits flow model (SD3 architecture): the lab's editor
against a transcription of FlowEdit's SD3 loop (``tests/references/flowedit.py``, from fallenshock/FlowEdit,
``FlowEdit_utils.py``) on the same transformer, the same digit, the same prompts and the same noise (one image:
its generator draws in the reference's order, n_avg draws per coupled step, one more where plain steps begin),
with classifier-free guidance on both velocities; and the evaluations counted by a hook on the transformer
against the editor's formula and against the reference's own calls (4 · n_avg rows per coupled step).

FLUX: the lab's editor on ``tiny-flux`` (embedded guidance, 2×2 packing, FLUX.1-dev's shifted schedule) against
a transcription of ``FlowEditFLUX`` on the same transformer, with the reference's schedule (``set_timesteps``
with ``sigmas = linspace(1, 1/T, T)`` and the resolution's shift μ), the same noise (drawn per image and
packed), one single-row call per velocity: 2 · n_avg rows per coupled step, as the runner charges them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ddim_lab.data import digits
from ddim_lab.engine.flow_denoiser import pack_latents
from ddim_lab.methods.editing import EditPrompts, make_editor
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.study.accounting import cost_guidance
from tests.conftest import model_spec
from tests.references import flowedit as ref
from tests.test_reference_parity_flow_editors import reference_model

N, SEED = 6, 5
G_SRC, G_TAR = 1.5, 4.5


@pytest.fixture(scope="module")
def flow_model(cache_dir):
    from ddim_lab.models.loading import load_model

    return load_model(model_spec("digits-flow"), {"device": "cpu"}, cache_dir)


@pytest.fixture(scope="module")
def setup(flow_model):
    scans, labels = digits.held_out_subset(1, seed=2)
    x0 = flow_model.encode(digits.to_rgb(scans, flow_model.resolution))  # (1, C, h, w)
    source = digits.caption(int(labels[0]))
    target = digits.caption((int(labels[0]) + 3) % 10)
    return x0, source, target


def rows_counted(transformer) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = transformer.register_forward_pre_hook(
        lambda _, args, kw: calls.append(len(kw["hidden_states"])), with_kwargs=True
    )
    return calls, handle


def lab_flowedit(flow_model, x0, source, target, knobs: dict, start: int = 0) -> torch.Tensor:
    inverter, editor = make_inverter("none"), make_editor({"name": "flowedit", **knobs})
    plan = inverter.plan(flow_model.scheduler(), N)
    den = flow_model.denoiser()
    src = flow_model.conditioning([source], [G_TAR])
    tar = flow_model.conditioning([target], [G_TAR])
    artifact = inverter.invert(den, x0, plan, src, InvertContext())
    gens = [torch.Generator().manual_seed(SEED)]
    rows = SampleRows(artifact, tar, src, torch.tensor([start]), torch.tensor([True]), gens)
    return editor.sample(inverter, den, plan, rows, EditPrompts([source], [target], [None]))


def reference(flow_model, x0, source, target, knobs: dict, calls: list[int]) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow_model.pipe.scheduler.config)
    scheduler.set_timesteps(N)
    src = flow_model.conditioning([source], [G_TAR])
    tar = flow_model.conditioning([target], [G_TAR])
    embeds = torch.cat([src.null, src.text, tar.null, tar.text])
    pooled = torch.cat(
        [src.extra["null_pooled"], src.extra["pooled"], tar.extra["null_pooled"], tar.extra["pooled"]]
    )
    gen = torch.Generator().manual_seed(SEED)
    return ref.flowedit_sd3(
        flow_model.pipe.transformer,
        scheduler.timesteps,
        scheduler.sigmas,
        x0.clone(),
        embeds,
        pooled,
        lambda like: torch.randn(like.shape, generator=gen, dtype=like.dtype),
        n_avg=knobs["n_avg"],
        src_guidance_scale=G_SRC,
        tar_guidance_scale=G_TAR,
        n_min=knobs["n_min"],
        n_max=knobs["n_max"],
        calls=calls,
    )


@pytest.mark.parametrize(
    "knobs",
    [
        {"n_max": 6, "n_min": 0, "n_avg": 2, "source_guidance": G_SRC},
        {"n_max": N, "n_min": 3, "n_avg": 1, "source_guidance": G_SRC},
        {"n_max": 20, "n_min": 0, "n_avg": 1, "source_guidance": G_SRC},  # n_max > N: every step
    ],
)
def test_flowedit_matches_the_reference_sd3_loop_and_its_counted_cost(flow_model, setup, knobs):
    x0, source, target = setup
    transformer = flow_model.pipe.transformer
    ours_calls, handle = rows_counted(transformer)
    try:
        ours = lab_flowedit(flow_model, x0, source, target, knobs)
    finally:
        handle.remove()
    ref_calls: list[int] = []
    theirs = reference(flow_model, x0, source, target, knobs, ref_calls)
    assert (ours - theirs).abs().max() < 1e-4  # measured 1.2e-5 (|x| up to 3.7, the edit moves it by 5.5)
    assert (ours - x0).abs().max() > 0.05  # it edited
    # evaluations: the hook against the formula, and the coupled steps against the reference's own calls
    editor = make_editor({"name": "flowedit", **knobs})
    plan = make_inverter("none").plan(flow_model.scheduler(), N)
    assert sum(ours_calls) == editor.trajectory_cost(None, plan, 0, G_TAR, True).forwards
    coupled = min(knobs["n_max"], N) - knobs["n_min"]
    assert sum(ref_calls[: coupled * knobs["n_avg"]]) == 4 * knobs["n_avg"] * coupled  # 2·n_avg per velocity
    assert (
        sum(ours_calls) == 4 * knobs["n_avg"] * coupled + 2 * knobs["n_min"]
    )  # the reference: 4 per plain step


def test_flowedit_from_a_later_start_step_starts_its_path_there(flow_model, setup):
    """A grid start step past N − n_max starts the path there: as the reference with n_max = N − k."""
    x0, source, target = setup
    knobs = {"n_max": N, "n_min": 0, "n_avg": 1, "source_guidance": G_SRC}
    ours = lab_flowedit(flow_model, x0, source, target, knobs, start=3)
    theirs = reference(flow_model, x0, source, target, {**knobs, "n_max": N - 3}, [])
    assert (ours - theirs).abs().max() < 1e-4


def flux_reference(model, x0, source, target, knobs: dict, calls: list[int]) -> torch.Tensor:
    """``FlowEditFLUX`` on the lab's FLUX transformer: its own schedule, packed latents, embedded guidance."""
    packed = pack_latents(x0)  # (1, H/2 · W/2, 4C)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    c = scheduler.config
    mu = calculate_shift(packed.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    models = {  # calc_v_flux with each prompt and its embedded guidance (the FLUX call of the editors' test)
        "src": reference_model(model, [source], x0.shape, guidance=G_SRC),
        "tar": reference_model(model, [target], x0.shape, guidance=G_TAR),
    }

    def velocity(latents: torch.Tensor, t: torch.Tensor, which: str) -> torch.Tensor:
        return models[which](latents, float(t) / 1000)  # calc_v_flux's timestep / 1000

    gen = torch.Generator().manual_seed(SEED)

    def noise(like: torch.Tensor) -> torch.Tensor:  # the lab's draw (per image, unpacked), packed
        return pack_latents(torch.randn(x0.shape, generator=gen, dtype=x0.dtype))

    out = ref.flowedit_flux(
        velocity,
        scheduler.timesteps,
        scheduler.sigmas,
        packed,
        noise,
        knobs["n_avg"],
        knobs["n_min"],
        knobs["n_max"],
        calls,
    )
    return out


@pytest.mark.parametrize(
    "knobs",
    [
        {"n_max": 5, "n_min": 0, "n_avg": 2, "source_guidance": G_SRC},
        {"n_max": N, "n_min": 2, "n_avg": 1, "source_guidance": G_SRC},
    ],
)
def test_flowedit_on_flux_matches_the_reference_and_is_charged_per_row(tiny_flux, knobs):
    torch.manual_seed(0)
    x0 = torch.randn(1, *tiny_flux.latent_shape)
    transformer = tiny_flux.network
    ours_calls, handle = rows_counted(transformer)
    try:
        ours = lab_flowedit(tiny_flux, x0, "a photograph of the cat", "a photograph of the dog", knobs)
    finally:
        handle.remove()
    ref_calls: list[int] = []
    theirs = flux_reference(
        tiny_flux, x0, "a photograph of the cat", "a photograph of the dog", knobs, ref_calls
    )
    ours = pack_latents(ours)
    delta, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    assert delta <= 1e-5 * scale, f"max |Δ| = {delta:.3e} against max |x| = {scale:.3f}"
    assert float((ours - pack_latents(x0)).abs().max()) > 100 * delta  # it edited, far beyond the tolerance
    editor = make_editor({"name": "flowedit", **knobs})
    plan = make_inverter("none").plan(tiny_flux.scheduler(), N)
    charged = editor.charged(None, plan, 0, G_TAR, True, lambda g: cost_guidance(tiny_flux.denoiser(), g))
    assert sum(ours_calls) == sum(ref_calls) == charged.forwards  # one row per velocity, whatever g
    coupled = min(knobs["n_max"], N) - knobs["n_min"]
    assert charged.forwards == 2 * knobs["n_avg"] * coupled + knobs["n_min"]
