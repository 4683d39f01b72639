"""Reference parity of the DDIM-family inverters on the shipped digits model (16 px, 8×8×4 latents, float32).

Each test runs a compact transcription of the method's reference code (``tests/references/``: its own loop
and scheduler arithmetic, the model's UNet called directly) and the lab's inverter (``make_inverter``,
``.invert``, ``.sample`` through ``LatentModel.denoiser``) on the same held-out digits, and asserts that the
latents agree to max |Δ| ≤ 1e-4 × their scale (float32 rounding through a few dozen network calls; the
measured values are in each test). Where the lab deviates on purpose, the test first puts the lab's
convention into the transcription to show that nothing else differs, then measures the deviation and asserts
its size:

- EDICT: leapfrogging counts sampling steps from plan step 0 (the reference: from the start step), so the two
  differ for odd start steps;
- BDIA: the first inversion step calls the network at the noisier step's time (the reference: at t − T/N),
  and sampling step 0 is a real step (the reference never evaluates the top: its sampling is the lab's from
  start step 1);
- edit-friendly: every noise map is kept (the reference zeroes ``zs[0]``, in its indexing the map of the last
  sampling step), and for η < 1 the ε direction is shortened by σ² (the reference: by η·σ²_{η=1});
- null-text: the learning rate and the early-stop threshold are functions of i/N (the reference: 1 − i/100 and
  i·2e-5, written for N = 50, where the two coincide exactly).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ddim_lab.data.folders import load_dataset
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import Artifact, InvertContext, SampleRows
from tests.references import bdia as ref_bdia
from tests.references import course_notebook, ddpm_inversion, pnp_inversion, renoise
from tests.references import edict as ref_edict
from tests.references import null_text_w_ptp as ptp
from tests.references.sd_unet import unet_eps

log = logging.getLogger(__name__)

DIGITS = Path(__file__).resolve().parents[1] / "ddim_lab" / "assets" / "digits-heldout"
RTOL = 1e-4  # max |Δ| ≤ RTOL × max |reference|: float32 rounding, far below any real difference (≥ 1e-2)
TARGET = "a handwritten digit seven"  # the edit prompt


@pytest.fixture(scope="module")
def lab(digits):
    """Three held-out digits of different classes: clean latents and the embeddings both sides use."""
    items = load_dataset(DIGITS, digits.resolution, "")[:6:2]
    B = len(items)
    return {
        "model": digits,
        "unet": digits.pipe.unet,
        "x0": digits.encode(torch.stack([it.image for it in items])),  # (3, 4, 8, 8)
        "text": digits.embed([it.prompt for it in items]),  # (3, 77, 64)
        "null": digits.embed([""] * B),
        "target": digits.embed([TARGET] * B),
    }


def reference_scheduler(model, num_steps: int) -> DDIMScheduler:
    """The references' own scheduler object (a diffusers DDIMScheduler from the model's config, as the
    prompt-to-prompt notebook builds it for SD), after ``set_timesteps``."""
    scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def lab_inverter(model, spec: dict | str, num_steps: int):
    """(inverter, plan, denoiser) of the lab, the plan and the denoiser from one scheduler."""
    scheduler = model.scheduler()
    inverter = make_inverter(spec)
    return inverter, inverter.plan(scheduler, num_steps), model.denoiser(scheduler)


def cond(lab: dict, text: torch.Tensor, guidance: float) -> Conditioning:
    n = len(text)
    return Conditioning(text, lab["null"][:n], torch.full((n,), float(guidance)))


def rows(artifact: Artifact, sample: Conditioning, source: Conditioning, start: int, edit: bool) -> SampleRows:
    n = len(sample)
    return SampleRows(artifact, sample, source, torch.full((n,), start), torch.full((n,), edit))


def assert_parity(what: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> float:
    """max |ours − theirs| ≤ rtol × max |theirs|; logged (the numbers the docs publish) and returned."""
    delta, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    log.info("parity %s: max |Δ| = %.2e (scale %.2f)", what, delta, scale)
    assert delta <= rtol * scale, f"{what}: max |Δ| = {delta:.3e} > {rtol:g} × {scale:.3f}"
    return delta


def assert_deviation(what: str, ours: torch.Tensor, theirs: torch.Tensor, low: float, high: float) -> float:
    """A stated deviation: max |ours − theirs| lies in [low, high] (its measured size, logged)."""
    delta = float((ours - theirs).abs().max())
    log.info("deviation %s: max |Δ| = %.3g", what, delta)
    assert low <= delta <= high, f"{what}: max |Δ| = {delta:.4g}, stated size [{low:g}, {high:g}]"
    return delta


# -- ddim: prompt-to-prompt's ddim_loop / DDIMScheduler.step, and diffusers' DDIMInverseScheduler ----------


def test_ddim_matches_prompt_to_prompt_and_diffusers(lab):
    """Inversion at guidance 1 (the pivot), sampling at guidance 1 and 7.5 from start steps 0 and 3."""
    N, model, unet, x0, text = 8, lab["model"], lab["unet"], lab["x0"], lab["text"]
    inverter, plan, denoiser = lab_inverter(model, "ddim", N)
    artifact = inverter.invert(denoiser, x0, plan, cond(lab, text, 1.0), InvertContext())
    scheduler = reference_scheduler(model, N)
    pivot = torch.stack(ptp.ddim_loop(unet, scheduler, x0, text), dim=1)  # (B, N+1, C, h, w)
    assert_parity("ddim inversion vs ddim_loop", artifact["trajectory"], pivot)  # measured 0 (bitwise)
    # diffusers' DDIMInverseScheduler, as its pipelines loop it (ε at each inverse timestep)
    inverse = DDIMInverseScheduler.from_config(model.pipe.scheduler.config)
    inverse.set_timesteps(N)
    z, walk = x0, [x0]
    with torch.no_grad():
        for t in inverse.timesteps:
            z = inverse.step(unet_eps(unet, z, t, text), t, z).prev_sample
            walk.append(z)
    assert_parity("ddim inversion vs DDIMInverseScheduler", artifact["trajectory"], torch.stack(walk, 1))
    for guidance in (1.0, 7.5):
        c = cond(lab, text, guidance)
        for k in (0, 3):  # the reference samples timesteps[-start_time:] from the pivot's latent there
            ours = inverter.sample(denoiser, plan, rows(artifact, c, c, k, False))
            theirs = ptp.text2image(unet, scheduler, pivot[:, N - k], text, lab["null"], guidance, N - k)
            assert_parity(f"ddim sampling g={guidance} k={k}", ours, theirs)  # measured ≤ 7.2e-6


# -- course: the seed notebook's invert() / sample() --------------------------------------------------------


def test_course_matches_the_notebook(lab):
    """The notebook's own setting (guidance 3.5 both ways), its N−2 latents and its start-step indexing
    ``inverted_latents[-(k+1)]``, reconstruction and a prompt swap."""
    N, g, model, unet, x0, text = 8, 3.5, lab["model"], lab["unet"], lab["x0"], lab["text"]
    inverter, plan, denoiser = lab_inverter(model, "course", N)
    artifact = inverter.invert(denoiser, x0, plan, cond(lab, text, g), InvertContext())
    scheduler = reference_scheduler(model, N)
    inverted = course_notebook.invert(unet, scheduler, x0, text, lab["null"], g, N)  # (B, N−2, C, h, w)
    assert inverted.shape[1] == N - 2 and artifact["trajectory"].shape[1] == N - 1  # x0 + the N−2 latents
    assert_parity("course inversion", artifact["trajectory"][:, 1:], inverted)  # measured 2.6e-6
    source = cond(lab, text, g)
    for k in (0, 3):
        for prompt, edit in ((text, False), (lab["target"], True)):
            ours = inverter.sample(denoiser, plan, rows(artifact, cond(lab, prompt, g), source, k, edit))
            theirs = course_notebook.sample(
                unet, scheduler, inverted[:, -(k + 1)], prompt, lab["null"], g, N, start_step=k
            )
            assert_parity(f"course sampling k={k} edit={edit}", ours, theirs)  # measured ≤ 1.1e-5


# -- negative-prompt and Direct inversion: PnPInversion ----------------------------------------------------


@pytest.mark.parametrize("method", ["negative_prompt", "direct"])
def test_pnp_inversion_methods_match_the_reference(lab, method):
    """Rows [source, target] from the top at guidance 7.5 (no attention control): the reconstruction row
    and the edit row of each image against the reference's two rows."""
    N, g, B, model, unet = 8, 7.5, 2, lab["model"], lab["unet"]
    x0, text, target, null = lab["x0"][:B], lab["text"][:B], lab["target"][:B], lab["null"][:B]
    inverter, plan, denoiser = lab_inverter(model, method, N)
    artifact = inverter.invert(denoiser, x0, plan, cond(lab, text, 1.0), InvertContext())
    source = cond(lab, text, g)
    ours_rec = inverter.sample(denoiser, plan, rows(artifact, source, source, 0, False))
    ours_edit = inverter.sample(denoiser, plan, rows(artifact, cond(lab, target, g), source, 0, True))
    scheduler = reference_scheduler(model, N)
    theirs = []
    for b in range(B):
        one = slice(b, b + 1)
        if method == "negative_prompt":
            pair = pnp_inversion.negative_prompt_edit(unet, scheduler, x0[one], text[one], target[one], g)
        else:
            pair = pnp_inversion.direct_edit(unet, scheduler, x0[one], text[one], target[one], null[one], g)
        theirs.append(pair)  # (2, C, h, w): [source row, target row]
    theirs = torch.stack(theirs)
    assert_parity(f"{method} reconstruction", ours_rec, theirs[:, 0])  # measured 1.7e-6 / 6.2e-6
    assert_parity(f"{method} edit", ours_edit, theirs[:, 1])  # measured 1.1e-5 / 7.8e-6
    if method == "direct":  # by construction the corrected source row ends on the input
        assert_parity("direct reconstruction vs input", ours_rec, x0)


# -- null-text: prompt-to-prompt's null_optimization -------------------------------------------------------


def null_text_reference(lab: dict, N: int, B: int, guidance: float, inner: int, lr=None, threshold=None):
    """The reference, one image at a time: per-step null embeddings (B, N, L, D) and the guided reconstruction
    from the top with them (B, C, h, w)."""
    scheduler = reference_scheduler(lab["model"], N)
    nulls, outs = [], []
    for b in range(B):
        text, null = lab["text"][b : b + 1], lab["null"][b : b + 1]
        pivot = ptp.ddim_loop(lab["unet"], scheduler, lab["x0"][b : b + 1], text)
        per_step = ptp.null_optimization(
            lab["unet"], scheduler, pivot, text, null, guidance, inner, lr=lr, threshold=threshold
        )
        nulls.append(torch.cat(per_step))
        outs.append(ptp.text2image(lab["unet"], scheduler, pivot[-1], text, per_step, guidance))
    return torch.stack(nulls), torch.cat(outs)


def null_text_lab(lab: dict, N: int, B: int, guidance: float, **knobs):
    inverter, plan, denoiser = lab_inverter(lab["model"], {"name": "null_text", **knobs}, N)
    x0, text = lab["x0"][:B], lab["text"][:B]
    artifact = inverter.invert(denoiser, x0, plan, cond(lab, text, 1.0), InvertContext(guidance=guidance))
    c = cond(lab, text, guidance)
    return inverter, artifact, inverter.sample(denoiser, plan, rows(artifact, c, c, 0, False))


def test_null_text_matches_null_optimization_under_the_labs_schedule(lab):
    """The reference's loop with the lab's i/N learning rate and threshold: the same optimisation and the same
    reconstruction. The threshold knobs are raised so that some steps stop early and others do not (the
    defaults never stop early on digits at N = 6), which puts the early stop itself under test.

    Parity is from start step 0: the reference always samples from the top (with ``start_time < N`` its
    ``uncond_embeddings[i]`` would count from the first step run, not from the top). The lab samples from a
    later start step k at null-text's own trajectory z̄_k with ∅_k … ∅_{N−1}, a convention of its own (issue
    19, item 1)."""
    N, g, B, inner = 6, 7.5, 2, 5
    knobs = {"inner_steps": inner, "epsilon": 0.05, "epsilon_growth": 0.1}
    inverter, artifact, ours = null_text_lab(lab, N, B, g, **knobs)
    used = artifact["inner_steps"]
    assert bool((used < inner).any()) and bool((used == inner).any()), used  # measured [1,2,1,1,1,1], [3,5,…]
    nulls, theirs = null_text_reference(
        lab, N, B, g, inner, lr=lambda i: inverter.step_lr(i, N), threshold=lambda i: inverter.threshold(i, N)
    )
    assert_parity("null-text reconstruction", ours, theirs)  # measured 1.8e-5
    # the embeddings agree less tightly: Adam's first step normalises the gradient, so elements whose gradient
    # is at rounding level move by ±lr with a rounding-decided sign; they barely act on the latents
    assert float((artifact["null"] - nulls).abs().max()) < 0.05 * float(nulls.abs().max())  # measured 6e-4


def test_null_text_schedule_deviates_from_the_reference_below_fifty_steps(lab):
    """lr_i = 1e-2·(1 − 0.5·i/N) and ε_i = 1e-5 + 1e-3·i/N against the reference's 1e-2·(1 − i/100) and
    1e-5 + i·2e-5 (default knobs): at N = 6 the reconstructions differ by the stated amount. At N = 50 the two
    schedules are the same numbers for every i (test_inverter_null_text.py::
    test_schedule_is_the_reference_at_fifty_steps), so by the test above the lab is then the reference."""
    g = 7.5
    _, _, ours = null_text_lab(lab, 6, 2, g, inner_steps=5)
    _, theirs = null_text_reference(lab, 6, 2, g, 5)  # the notebook's literal schedule
    assert_deviation("null-text i/N schedule at N=6", ours, theirs, 0.03, 1.0)  # measured 0.12


# -- EDICT: salesforce/EDICT coupled_stablediffusion ------------------------------------------------------


@pytest.fixture(scope="module")
def edict_runs(lab):
    """The lab's EDICT artifact (N = 8, inversion guidance 3, the reference's editing default) and the
    reference's inversion to each start step k (its init_image_strength: t_limit = k).

    N divides 1000 here (and for BDIA, whose steps are EDICT's): for other N the references step to the
    fractional time t − 1000/N with an interpolated ᾱ (weights swapped), while the lab (diffusers) steps to
    t − 1000//N, the next timestep; measured at N = 6: pairs 0.02 (BDIA 0.06), edits 0.05 (BDIA 0.20)."""
    N, g = 8, 3.0
    inverter, plan, denoiser = lab_inverter(lab["model"], "edict", N)
    artifact = inverter.invert(denoiser, lab["x0"], plan, cond(lab, lab["text"], g), InvertContext())
    scheduler = reference_scheduler(lab["model"], N)

    pairs: dict[int, list[torch.Tensor]] = {}

    def reference(k: int, prompt: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if k not in pairs:
            x0 = lab["x0"]
            pairs[k] = ref_edict.coupled_stablediffusion(
                lab["unet"], scheduler, [x0, x0], lab["text"], lab["null"], g, reverse=True, t_limit=k
            )
        pair = pairs[k]
        out = ref_edict.coupled_stablediffusion(
            lab["unet"], scheduler, pair, prompt, lab["null"], g, reverse=False, t_limit=k
        )
        return pair, out[0]  # the reference's image of the first latent, x

    def ours(k: int, prompt: torch.Tensor, edit: bool) -> torch.Tensor:
        source = cond(lab, lab["text"], g)
        return inverter.sample(denoiser, plan, rows(artifact, cond(lab, prompt, g), source, k, edit))

    return {"N": N, "artifact": artifact, "reference": reference, "ours": ours}


@pytest.mark.parametrize("k", [0, 2])
def test_edict_matches_the_reference_from_even_start_steps(lab, edict_runs, k):
    N, artifact = edict_runs["N"], edict_runs["artifact"]
    for prompt, edit in ((lab["text"], False), (lab["target"], True)):
        pair, theirs = edict_runs["reference"](k, prompt)
        assert_parity(f"edict inversion x k={k}", artifact["x"][:, N - k], pair[0])  # measured ≤ 3.3e-6
        assert_parity(f"edict inversion y k={k}", artifact["y"][:, N - k], pair[1])
        ours = edict_runs["ours"](k, prompt, edit)
        assert_parity(f"edict sampling k={k} edit={edit}", ours, theirs)  # measured ≤ 8.4e-5 (scale 6.3)


def test_edict_leapfrog_parity_differs_from_the_reference_at_odd_start_steps(lab, edict_runs):
    """The reference leapfrogs from the start step, the lab from plan step 0 (one inversion for every start
    step): at k = 1 every step swaps which latent moves first. Both stay exact inverses of their own sampling
    (reconstructions agree); the inverted pairs and the edits differ."""
    N, k, artifact = edict_runs["N"], 1, edict_runs["artifact"]
    pair, theirs = edict_runs["reference"](k, lab["text"])
    assert_deviation("edict pair at odd k=1", artifact["x"][:, N - k], pair[0], 0.02, 0.6)  # measured 0.13
    assert_parity("edict reconstruction k=1", edict_runs["ours"](k, lab["text"], False), theirs)
    _, theirs = edict_runs["reference"](k, lab["target"])
    ours = edict_runs["ours"](k, lab["target"], True)
    assert_deviation("edict edit at odd k=1", ours, theirs, 0.5, 15.0)  # measured 4.6 (RMS 0.37)


# -- BDIA: guoqiang-zhang-x/BDIA BDIA_stablediffusion -----------------------------------------------------


@pytest.fixture(scope="module")
def bdia_runs(lab):
    """The lab's BDIA artifact (N = 8, guidance 3, γ = 0.94) and the reference's inversion/sampling."""
    N, g, gamma = 8, 3.0, 0.94
    inverter, plan, denoiser = lab_inverter(lab["model"], {"name": "bdia", "gamma": gamma}, N)
    artifact = inverter.invert(denoiser, lab["x0"], plan, cond(lab, lab["text"], g), InvertContext())
    scheduler = reference_scheduler(lab["model"], N)

    pairs: dict[tuple[int, bool], list[torch.Tensor]] = {}

    def invert(t_limit: int, lab_first_call: bool) -> list[torch.Tensor]:
        if (t_limit, lab_first_call) not in pairs:
            x0 = lab["x0"]
            pairs[t_limit, lab_first_call] = ref_bdia.bdia_stablediffusion(
                lab["unet"],
                scheduler,
                [x0, x0],
                lab["text"],
                lab["null"],
                g,
                gamma,
                True,
                t_limit,
                lab_first_call,
            )
        return pairs[t_limit, lab_first_call]

    def sample(pair: list[torch.Tensor], t_limit: int, prompt: torch.Tensor) -> torch.Tensor:
        return ref_bdia.bdia_stablediffusion(
            lab["unet"], scheduler, pair, prompt, lab["null"], g, gamma, False, t_limit
        )[0]

    def ours(k: int, prompt: torch.Tensor, edit: bool) -> torch.Tensor:
        source = cond(lab, lab["text"], g)
        return inverter.sample(denoiser, plan, rows(artifact, cond(lab, prompt, g), source, k, edit))

    return {"N": N, "artifact": artifact, "invert": invert, "sample": sample, "ours": ours}


@pytest.mark.parametrize("t_limit", [0, 2])
def test_bdia_matches_the_reference_with_the_labs_first_call(lab, bdia_runs, t_limit):
    """With the first inversion step's network call at the noisier time (the lab's convention), the
    reference's inversion to t_limit ends on the lab's (z_{N−t_limit}, z_{N−t_limit−1}), and its sampling from
    that pair — which skips the step it starts at — is the lab's from start step t_limit + 1."""
    N, artifact = bdia_runs["N"], bdia_runs["artifact"]
    pair = bdia_runs["invert"](t_limit, True)
    top = N - t_limit
    assert_parity(f"bdia inversion z_{top}", artifact["trajectory"][:, top], pair[0])  # measured 4.5e-6
    assert_parity(f"bdia inversion z_{top - 1}", artifact["trajectory"][:, top - 1], pair[1])
    for prompt, edit in ((lab["text"], False), (lab["target"], True)):
        theirs = bdia_runs["sample"](pair, t_limit, prompt)
        ours = bdia_runs["ours"](t_limit + 1, prompt, edit)
        assert_parity(f"bdia sampling k={t_limit + 1} edit={edit}", ours, theirs)  # ≤ 1.8e-4 (scale 4.9)


def test_bdia_first_step_and_top_step_deviate_as_stated(lab, bdia_runs):
    """1. The reference's first inversion step calls the network at t − T/N (negative for the first timestep);
    the lab's at t: the top latent moves, reconstructions stay exact, edits move.
    2. The reference never evaluates the top step; the lab's sampling step 0 does (with the sampling prompt),
    from the stored partner z_{N+1}: a reconstruction from step 0 is still exact, an edit takes one more
    target-prompt step than the reference's."""
    N, artifact, x0 = bdia_runs["N"], bdia_runs["artifact"], lab["x0"]
    theirs_pair = bdia_runs["invert"](0, False)  # the reference's own first step
    assert_deviation("bdia first step: z_N", artifact["trajectory"][:, N], theirs_pair[0], 0.01, 0.2)  # 0.036
    assert_parity("bdia reference reconstruction", bdia_runs["sample"](theirs_pair, 0, lab["text"]), x0)
    theirs_edit = bdia_runs["sample"](theirs_pair, 0, lab["target"])
    assert_deviation("bdia first step: edit", bdia_runs["ours"](1, lab["target"], True), theirs_edit, 0.2, 4.0)
    # 2. the top step (the reference with the lab's first call, so that only the top step differs)
    pair = bdia_runs["invert"](0, True)
    assert_parity("bdia reconstruction from step 0", bdia_runs["ours"](0, lab["text"], False), x0)
    theirs_edit = bdia_runs["sample"](pair, 0, lab["target"])
    assert_deviation("bdia top step: edit", bdia_runs["ours"](0, lab["target"], True), theirs_edit, 2.0, 20.0)
    # measured: 0.98 (first step, edit) and 8.1 (top step, edit): the edits are different images


# -- edit-friendly DDPM inversion: inbarhub/DDPM_inversion --------------------------------------------------


def edit_friendly_reference(lab: dict, N: int, B: int, guidance: float, eta: float, seed: int = 10):
    """The reference's (zs (B, N, …), xts (B, N+1, …)), image b drawing from ``Generator(seed + b)``."""
    scheduler = reference_scheduler(lab["model"], N)
    runs = [
        ddpm_inversion.inversion_forward_process(
            lab["unet"],
            scheduler,
            lab["x0"][b : b + 1],
            lab["text"][b : b + 1],
            lab["null"][b : b + 1],
            guidance,
            eta,
            torch.Generator().manual_seed(seed + b),
        )
        for b in range(B)
    ]
    return scheduler, torch.stack([r[0] for r in runs]), torch.stack([r[1] for r in runs])


def edit_friendly_lab(lab: dict, N: int, B: int, guidance: float, eta: float, seed: int = 10):
    inverter, plan, denoiser = lab_inverter(lab["model"], {"name": "edit_friendly", "eta": eta}, N)
    ctx = InvertContext(generators=[torch.Generator().manual_seed(seed + b) for b in range(B)])
    artifact = inverter.invert(denoiser, lab["x0"][:B], plan, cond(lab, lab["text"][:B], guidance), ctx)
    return inverter, plan, denoiser, artifact


def test_edit_friendly_matches_the_reference_but_for_the_last_noise_map(lab):
    """The same x_t's and noise maps (the reference's zs[N−1−i] is the lab's map of sampling step i); with the
    lab's last map zeroed as the reference zeroes its zs[0], sampling agrees for reconstructions and edits.
    The deviation: the reference's reconstruction then misses x₀ by exactly σ_{N−1}·z_{N−1} (the map it
    dropped); the lab's lands on x₀."""
    N, B, g, g_edit, eta = 6, 2, 3.5, 7.5, 1.0  # the paper's inversion guidance 3.5; a stronger target
    scheduler, zs, xts = edit_friendly_reference(lab, N, B, g, eta)
    inverter, plan, denoiser, artifact = edit_friendly_lab(lab, N, B, g, eta)
    assert_parity("edit-friendly x_t's", artifact["trajectory"], xts)  # measured 3.6e-7
    maps = artifact["noise"].flip(1)  # in the reference's order: column idx is sampling step N − 1 − idx
    assert_parity("edit-friendly noise maps", maps[:, 1:], zs[:, 1:])  # measured 4.2e-5 (scale 33)
    assert float(zs[:, 0].abs().max()) == 0.0 and float(maps[:, 0].abs().max()) > 1.0  # what the ref drops
    zeroed = {**artifact, "noise": artifact["noise"].clone()}
    zeroed["noise"][:, N - 1] = 0.0
    x0, text, target, null = lab["x0"][:B], lab["text"][:B], lab["target"][:B], lab["null"][:B]
    for prompt, guidance, edit, k in (
        (text, g, False, 0),
        (target, g_edit, True, 0),
        (target, g_edit, True, 2),
    ):
        c, source = cond(lab, prompt, guidance), cond(lab, text, guidance)
        ours = inverter.sample(denoiser, plan, rows(zeroed, c, source, k, edit))
        theirs = torch.cat(
            [
                ddpm_inversion.inversion_reverse_process(
                    lab["unet"],
                    scheduler,
                    xts[b, N - k][None],
                    prompt[b : b + 1],
                    null[b : b + 1],
                    guidance,
                    eta,
                    zs[b, : N - k],
                )
                for b in range(B)
            ]
        )
        assert_parity(f"edit-friendly sampling k={k} edit={edit}, last map zeroed", ours, theirs)
        if not edit:  # measured 3.2e-6; the lab with its last map: exactly x₀
            full = inverter.sample(denoiser, plan, rows(artifact, c, source, k, edit))
            assert_parity("edit-friendly reconstruction vs input", full, x0)
            sigma = eta * ddpm_inversion.get_variance(scheduler, scheduler.timesteps[-1]) ** 0.5
            assert_parity("reference miss = σ_{N−1}·z_{N−1}", x0 - theirs, sigma * artifact["noise"][:, N - 1])
            assert_deviation("edit-friendly last map: reference reconstruction", theirs, x0, 0.02, 0.6)  # 0.124


def test_edit_friendly_eta_below_one_shortens_the_direction_differently(lab):
    """For η < 1 the reference's direction is √(1 − ᾱ_prev − η·σ²_{η=1}), the lab's DDIM √(1 − ᾱ_prev − σ²)
    with σ = η·σ_{η=1}: different maps, both exact on a reconstruction, different edits (η = 0.5)."""
    N, B, g, eta = 6, 2, 3.5, 0.5
    scheduler, zs, xts = edit_friendly_reference(lab, N, B, g, eta)
    inverter, plan, denoiser, artifact = edit_friendly_lab(lab, N, B, g, eta)
    maps = artifact["noise"].flip(1)
    assert_deviation("edit-friendly η=0.5 maps", maps[:, 1:], zs[:, 1:], 0.1, 5.0)  # measured 0.93
    target, null = lab["target"][:B], lab["null"][:B]
    c, source = cond(lab, target, 7.5), cond(lab, lab["text"][:B], 7.5)
    ours = inverter.sample(denoiser, plan, rows(artifact, c, source, 0, True))
    theirs = torch.cat(
        [
            ddpm_inversion.inversion_reverse_process(
                lab["unet"], scheduler, xts[b, N][None], target[b : b + 1], null[b : b + 1], 7.5, eta, zs[b]
            )
            for b in range(B)
        ]
    )
    assert_deviation("edit-friendly η=0.5 edit", ours, theirs, 0.1, 5.0)  # measured 1.5


# -- fixed-point inversion: ReNoise inversion_step --------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_fixed_point_matches_renoise_with_one_schedule_for_every_step(lab, guidance):
    """``iters`` renoising iterations per step and the mean of the last ``average`` ε's ↔ ReNoise's
    ``num_renoise_steps`` and ``avg_range = (iters + 1 − average, iters + 1)``. ReNoise's separate settings
    for t < 250 (at most 5 iterations, averaging ε_0 … ε_4) are switched off (``first_step_max_timestep=0``):
    the lab has one schedule for every step (measured: with them the trajectories differ by 0.52 here)."""
    N, B, iters, average = 6, 2, 3, 2
    knobs = {"name": "fixed_point", "iters": iters, "average": average}
    inverter, plan, denoiser = lab_inverter(lab["model"], knobs, N)
    x0, text = lab["x0"][:B], lab["text"][:B]
    artifact = inverter.invert(denoiser, x0, plan, cond(lab, text, guidance), InvertContext())
    theirs = renoise.invert(
        lab["unet"],
        reference_scheduler(lab["model"], N),
        x0,
        text=text,
        null=lab["null"][:B],
        guidance_scale=guidance,
        num_renoise_steps=iters,
        avg_range=(iters + 1 - average, iters + 1),
        first_step_max_timestep=0,
    )
    assert_parity(f"fixed-point inversion g={guidance}", artifact["trajectory"], theirs)  # measured ≤ 6.8e-6
