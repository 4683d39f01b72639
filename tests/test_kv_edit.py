"""KV-Edit (ddim_lab/methods/editing/kv_edit.py): identical prompts reproduce the reconstruction exactly (SD3
with CFG and the context fold, FLUX with embedded guidance); an edit keeps its source's latent outside the mask
exactly and moves inside it; the masks (latent grid, tokens, derived); the engine's counted evaluations equal
the formula on PIE data and the data's mask enters the protocol id; bad input as one line before any model
loads. Reference parity: ``tests/test_reference_parity_kv_edit.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddim_lab.config.validate import validate
from ddim_lab.engine.flow_denoiser import FlowDenoiser
from ddim_lab.methods.editing import make_editor
from ddim_lab.methods.editing.kv_edit import derived_mask, latent_mask, token_mask
from ddim_lab.study.runner import Runner, load_items
from tests.conftest import lab_config
from tests.test_flow_editors import edit_batch

ATOL = 1e-5  # batch-size rounding (the pairs batch differently from a plain reconstruction)


def corner(resolution: int) -> torch.Tensor:
    """A (1, R, R) edit region: the top-left quarter plus a few pixels (partial tokens)."""
    m = torch.zeros(1, resolution, resolution)
    m[:, : resolution // 2 + 3, : resolution // 2 - 1] = 1
    return m


@pytest.mark.parametrize("model_name, guidance", [("digits_flow", 3.0), ("tiny_flux", 3.5)])
def test_identical_prompts_reproduce_the_reconstruction(request, model_name, guidance):
    model = request.getfixturevalue(model_name)
    inv, plan, denoiser, rows, prompts = edit_batch(model, "rf_solver", guidance)
    recon = inv.sample(denoiser, plan, replace(rows, cond=rows.source, edit=~rows.edit))
    fresh = model.denoiser()
    derived = make_editor("kv_edit").sample(inv, fresh, plan, rows, prompts)  # no data mask: Δ ≡ 0, empty
    torch.testing.assert_close(derived, recon, rtol=0, atol=ATOL)
    if model.family == "sd3":  # the key-bias processor keeps the context fold
        assert fresh._fold_processors
    masked = replace(prompts, masks=[corner(model.resolution)] * 2)
    plain = make_editor({"name": "kv_edit", "attn_scale": 0.0}).sample(inv, denoiser, plan, rows, masked)
    torch.testing.assert_close(plain, recon, rtol=0, atol=ATOL)
    # attn_scale > 0 re-weights the foreground's attention whatever the prompts (the reference's bias):
    # outside the mask the result is still the reconstruction, inside it moves
    biased = make_editor("kv_edit").sample(inv, denoiser, plan, rows, masked)
    inside = latent_mask(corner(model.resolution)[None], recon.shape[-2:])[0].bool()  # (h, w)
    torch.testing.assert_close(biased[..., ~inside], recon[..., ~inside], rtol=0, atol=ATOL)
    assert float((biased - recon)[..., inside].abs().max()) > 1e-3


def test_an_edit_keeps_its_source_outside_the_mask(digits_flow):
    targets = ["a handwritten digit eight", "a handwritten digit one"]
    inv, plan, denoiser, rows, prompts = edit_batch(digits_flow, "rf_solver", 3.0, targets)
    recon = inv.sample(denoiser, plan, replace(rows, cond=rows.source, edit=~rows.edit))
    masked = replace(prompts, masks=[corner(digits_flow.resolution)] * 2)
    out = make_editor("kv_edit").sample(inv, denoiser, plan, rows, masked, batch_size=2)  # one pair a chunk
    swap = make_editor("prompt_swap").sample(inv, denoiser, plan, rows, masked)
    inside = latent_mask(corner(digits_flow.resolution)[None], out.shape[-2:])[0].bool()
    torch.testing.assert_close(out[..., ~inside], recon[..., ~inside], rtol=0, atol=ATOL)
    assert float((out - recon)[..., inside].abs().max()) > 0.1  # the edit happens inside
    assert float((out - swap)[..., inside].abs().max()) > 0.1  # and is not prompt swap's


def test_the_key_bias_survives_the_context_fold(digits_flow):
    """SD3's joint attention takes the bias through ``token_fold``'s processor: folded (digits-flow's 256 zero
    T5 tokens as one) and unfolded give the same edit."""
    targets = ["a handwritten digit eight", "a handwritten digit one"]
    inv, plan, denoiser, rows, prompts = edit_batch(digits_flow, "rf_solver", 3.0, targets)
    masked = replace(prompts, masks=[corner(digits_flow.resolution)] * 2)
    editor = make_editor({"name": "kv_edit", "attn_scale": 2.0})
    folded = editor.sample(inv, denoiser, plan, rows, masked)
    assert denoiser._fold_processors
    full = FlowDenoiser(digits_flow.network, digits_flow.family, digits_flow.guidance, fold_context=False)
    torch.testing.assert_close(editor.sample(inv, full, plan, rows, masked), folded, rtol=0, atol=ATOL)
    unbiased = make_editor({"name": "kv_edit", "attn_scale": 0.0}).sample(inv, full, plan, rows, masked)
    assert float((unbiased - folded).abs().max()) > 1e-2  # the bias acts on SD3 too


def test_masks_on_the_latent_grid_tokens_and_derived():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 0:3, 0:5] = 1  # pixels 0–2 × 0–4: latent (8×8) rows 0–1, columns 0–2 (bilinear, any > 0)
    grid = latent_mask(image, (8, 8))
    expected = torch.zeros(8, 8)
    expected[0:2, 0:3] = 1
    assert torch.equal(grid[0], expected)
    tokens = token_mask(grid, 2).view(4, 4)  # 2×2 patches: any pixel in → row 0, columns 0–1
    assert tokens.tolist() == [[True, True, False, False]] + [[False] * 4] * 3
    v_s = torch.zeros(1, 4, 4, 4)
    v_t = v_s.clone()
    v_t[..., 2:, 2:] = 1.0
    assert derived_mask(v_t, v_s, 0.5)[0].tolist() == [[0.0] * 4] * 2 + [[0, 0, 1, 1]] * 2
    assert not derived_mask(v_s, v_s, 0.5).any()  # identical velocities: no edit region


def test_engine_counts_its_formula_and_the_data_mask_enters_the_protocol(digits_flow):
    overrides = ["data=digits-pie", "task=edit", "guidance_scale=[3]", "start_step=[1]", "data.categories=[1]"]
    runners = {}
    for editor in ("kv_edit", "prompt_swap"):
        cfg = lab_config(*overrides, f"editor={editor}", model="digits-flow", steps=4)
        validate(cfg)
        runners[editor] = Runner(cfg, digits_flow)
        items = load_items(cfg, digits_flow.resolution)[:1]
        runners[editor].set_protocol(items)
    runner = runners["kv_edit"]
    rows, _ = runner.run_group(items)
    assert runner.evals["sampling"] == sum(r["unet_evals"] for r in rows) > 0  # counted == formula
    assert runner.denoiser.unet_evals == runner.minimum.forwards
    assert [r["unet_evals"] for r in rows] == [2 * 3 * 2]  # edit + source: 3 Euler steps (4 − 1) × CFG 2
    kv, swap = runner.protocol, runners["prompt_swap"].protocol
    assert kv.mask_use == "input" and swap.mask_use == "score-only"
    assert kv.id() != swap.id() and {r["protocol"] for r in rows} == {kv.id()}
