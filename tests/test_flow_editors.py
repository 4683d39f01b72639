"""Editors on flow transformers (ddim_lab/methods/editing/injection.py, rf_edit.py, uni_edit.py): identical
prompts reproduce the reconstruction exactly (SD3 with CFG and the context fold, FLUX with embedded
guidance; every flow solver), the injection windows and evaluation steps (midpoints included), the fusion
map, and bad input as one line before any model loads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddim_lab.config.validate import validate
from ddim_lab.data import digits as digits_data
from ddim_lab.errors import ConfigError
from ddim_lab.methods.editing import EditPrompts, make_editor
from ddim_lab.methods.editing.injection import (
    InjectingDenoiser,
    Injection,
    flow_transformer,
    pair_rows,
    step_index,
)
from ddim_lab.methods.editing.rf_edit import injected_window, value_modules
from ddim_lab.methods.editing.uni_edit import fuse, region_mask
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.models.latent import FlowModel
from tests.conftest import lab_config

N = 4
FULL = {"inject": 1.0, "share_from": 0.0}  # every block, every step


def edit_batch(model: FlowModel, inverter_name: str, guidance: float, targets: list[str] | None = None):
    """(inverter, plan, denoiser, rows, prompts): two images edited from start steps 0 and 2 (to their own
    prompts unless ``targets``)."""
    if model.family == "sd3":
        scans, labels = digits_data.held_out_subset(2, seed=1)
        x0 = model.encode(digits_data.to_rgb(scans, model.resolution))
        sources = [digits_data.caption(int(k)) for k in labels]
    else:
        x0 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
        sources = ["a photograph of the cat", "a cup of coffee"]
    targets = targets or sources
    inverter = make_inverter(inverter_name)
    plan, denoiser = inverter.plan(model.scheduler(), N), model.denoiser()
    artifact = inverter.invert(denoiser, x0, plan, model.conditioning(sources, [1.0, 1.0]), InvertContext())
    g = [guidance] * 2
    rows = SampleRows(
        artifact,
        model.conditioning(targets, g),
        model.conditioning(sources, g),
        torch.tensor([0, 2]),
        torch.ones(2, dtype=torch.bool),
    )
    return inverter, plan, denoiser, rows, EditPrompts(sources, targets, [None, None])


@pytest.mark.parametrize("model_name, guidance", [("digits_flow", 3.0), ("tiny_flux", 3.5)])
@pytest.mark.parametrize("inverter", ["rf_solver", "fireflow", "uni_inv"])
def test_identical_prompts_reproduce_the_reconstruction(request, model_name, guidance, inverter):
    model = request.getfixturevalue(model_name)
    inv, plan, denoiser, rows, prompts = edit_batch(model, inverter, guidance)
    fresh = model.denoiser()
    out = make_editor({"name": "rf_edit", **FULL}).sample(inv, fresh, plan, rows, prompts)
    if model.family == "sd3":  # the hooks keep diffusers' processors, so the context fold still ran
        assert fresh._fold_processors
    recon = inv.sample(denoiser, plan, replace(rows, cond=rows.source, edit=~rows.edit))
    paired, take = pair_rows(rows)
    plain = inv.sample(denoiser, plan, replace(paired, edit=~paired.edit))  # the same batch, no injection
    assert torch.equal(out, plain[take])  # bit for bit
    torch.testing.assert_close(out, recon, rtol=0, atol=1e-5)  # batch-size rounding only
    fused = make_editor("uni_edit").sample(inv, denoiser, plan, rows, prompts)  # Δ ≡ 0: no fusion
    torch.testing.assert_close(fused, recon, rtol=0, atol=1e-5)


def test_uni_edit_fuses_by_the_difference_map():
    v_s = torch.zeros(1, 2, 4, 4)
    v_t = v_s.clone()
    v_t[..., :2, :2] = 1.0  # the top-left 2×2 patch differs by 1, the rest not at all
    m = region_mask(v_t - v_s)
    assert m[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    v = fuse(v_t, v_s, omega=5.0)  # m = 1: v_t + 2ω·Δ = 11 on the patch; m = 0: v_s = 0 elsewhere
    assert v[..., :2, :2].eq(11).all() and v[..., 2:, :].eq(0).all() and v[..., :2, 2:].eq(0).all()


def test_sharing_changes_an_edit_and_inject_zero_is_prompt_swap(digits_flow):
    inv, plan, denoiser, rows, prompts = edit_batch(
        digits_flow, "rf_solver", 3.0, ["a handwritten digit eight", "a handwritten digit one"]
    )
    swap = make_editor("prompt_swap").sample(inv, denoiser, plan, rows, prompts)
    off = make_editor({"name": "rf_edit", "inject": 0.0}).sample(inv, denoiser, plan, rows, prompts)
    torch.testing.assert_close(off, swap, rtol=0, atol=1e-5)
    shared = make_editor({"name": "rf_edit", **FULL}).sample(inv, denoiser, plan, rows, prompts)
    assert float((shared - swap).abs().max()) > 1e-2


def test_value_modules_are_the_late_blocks(digits_flow, tiny_flux):
    sd3 = digits_flow.network  # 6 joint blocks: round(0.5263 · 6) = 3 → blocks 3, 4, 5, image and context V
    late = value_modules(sd3, 0.5263)
    assert late == [m for b in sd3.transformer_blocks[3:] for m in (b.attn.to_v, b.attn.add_v_proj)]
    flux = tiny_flux.network  # FLUX: single-stream blocks only (38 in FLUX.1: 20 … 37)
    assert value_modules(flux, 0.0) == [flux.single_transformer_blocks[0].attn.to_v]
    assert value_modules(flux, 0.5263) == []  # round(0.53) = 1 of its 1
    assert round(0.5263 * 38) == 20


def test_windows_count_the_pairs_steps_and_midpoints_belong_to_their_step(tiny_flux):
    assert injected_window(0.8, torch.tensor([25, 10, 3])).tolist() == [20, 8, 2]  # the reference's 20 of 25
    plan = make_inverter("rf_solver").plan(tiny_flux.scheduler(), 6)
    t = plan.timesteps.double()
    mid = torch.cat([(t[:-1] + t[1:]) / 2, t[-1:] / 2])  # (6,) RF-Solver's half-step evaluations
    assert step_index(plan, t).tolist() == list(range(6))
    assert step_index(plan, mid).tolist() == list(range(6))
    assert step_index(plan, t * (1 + 1e-12)).tolist() == list(range(6))  # σ · 1000 rounding
    cond = tiny_flux.conditioning(["a cat"], [3.5])
    rows = SampleRows({}, cond, cond, torch.tensor([2]), torch.tensor([True]))
    paired, _ = pair_rows(rows)
    den = InjectingDenoiser(tiny_flux.denoiser(), Injection(), plan)
    lay = den.layout(mid[3].expand(2), paired.cond)
    assert (lay.target.tolist(), lay.source.tolist(), lay.step.tolist(), lay.steps.tolist()) == (
        [1],
        [0],
        [1],
        [4],
    )


def test_cfg_branches_pair_targets_with_their_sources_in_each_branch(digits_flow):
    cond = digits_flow.conditioning(["a handwritten digit one", "a handwritten digit two"], [3.0, 1.0])
    rows = SampleRows({}, cond, cond, torch.tensor([0, 0]), torch.tensor([True, True]))
    paired, _ = pair_rows(
        rows
    )  # rows: (src 0, tgt 0, src 1, tgt 1); row pair 0 at guidance 3 has a null branch
    plan = make_inverter("rf_solver").plan(digits_flow.scheduler(), N)
    lay = InjectingDenoiser(digits_flow.denoiser(), Injection(), plan).layout(
        plan.timesteps[:1].expand(4), paired.cond
    )
    # network batch: prompt rows 0, 1, 2, 3 at positions 0 … 3, then null rows 0, 1 at positions 4, 5
    assert (lay.target.tolist(), lay.source.tolist()) == ([1, 3, 5], [0, 2, 4])


def test_injection_editors_need_a_flow_transformer():
    class UNetLike:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="editor=rf_edit runs on flow transformers .* this model runs Linear"):
        flow_transformer(UNetLike(), "rf_edit")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("editor=rf_edit",), "editor=rf_edit runs on flow models only"),
        (("model=digits-flow", "editor=rf_edit", "editor.inject=1.5"), "inject=1.5 must be a fraction"),
        (("model=digits-flow", "editor=rf_edit", "editor.share_from=-1"), "share_from=-1"),
        (("editor=uni_edit",), "editor=uni_edit runs on flow models only"),
        (("model=digits-flow", "editor=uni_edit", "editor.omega=-1"), "omega=-1 must be a number >= 0"),
        (("editor=kv_edit",), "editor=kv_edit runs on flow models only"),
        (("model=digits-flow", "editor=kv_edit", "editor.mask=data"), "mask=data needs the data's edit masks"),
        (("model=digits-flow", "editor=kv_edit", "editor.mask=attention"), "mask='attention' must be one of"),
        (("model=digits-flow", "editor=kv_edit", "editor.attn_scale=-1"), "attn_scale=-1 must be a number"),
        (("model=digits-flow", "editor=kv_edit", "editor.threshold=1"), "threshold=1 must be a fraction"),
    ],
)
def test_bad_flow_editor_config_stops_before_any_model_loads(overrides, message):
    model = "digits" if "model=digits-flow" not in overrides else "digits-flow"
    rest = [o for o in overrides if not o.startswith("model=")]
    cfg = lab_config("task=edit", "edit_prompt=a handwritten digit eight", *rest, model=model)
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_pairs_survive_chunking(digits_flow):
    inv, plan, denoiser, rows, prompts = edit_batch(
        digits_flow, "rf_solver", 3.0, ["a handwritten digit eight", "a handwritten digit one"]
    )
    editor = make_editor({"name": "rf_edit", **FULL})
    whole = editor.sample(inv, denoiser, plan, rows, prompts)
    chunked = editor.sample(inv, denoiser, plan, rows, prompts, batch_size=3)  # chunks of 2: one pair each
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
