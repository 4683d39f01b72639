"""Prompt-to-prompt editing (ddim_lab/editing): identity, the replacement windows against a transcription of
the reference's (google/prompt-to-prompt), attention edits on the processor, token alignment, local blend,
pairs under chunking, every inverter's source path, rows and accounting, config errors."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ddim_lab.config.validate import validate
from ddim_lab.errors import ConfigError
from ddim_lab.methods.editing import EditPrompts, make_editor
from ddim_lab.methods.editing.align import align, refine_map, replace_map, token_ids, word_tokens
from ddim_lab.methods.editing.attention import AttentionControl, Layout, P2PAttnProcessor
from ddim_lab.methods.editing.p2p import SOURCE, TARGET, PairedDenoiser, attention_network
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import SampleRows
from ddim_lab.models.tokenizer import build_tokenizer
from ddim_lab.study.runner import Runner, load_items
from tests.conftest import lab_config
from tests.denoisers import sd_scheduler, toy_cond

SOURCE_PROMPT, TARGET_PROMPT = "a handwritten digit three", "a handwritten digit eight"
FULL = {"cross_replace_steps": 1.0, "self_replace_steps": 1.0, "target_word_weight": 1.0}  # weights 1


# -- helpers -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def p2p_cache(cache_dir):
    """One inversion cache for this file: the inverters' artifacts are computed once."""
    return cache_dir / "p2p"


def runner_for(digits, cache, inverter: str, *overrides: str, starts: str = "[0,3]") -> Runner:
    """A runner on the digits model, 8 steps, guidance 3, start steps ``starts``, inversions cached."""
    grid_points = ("guidance_scale=[3]", f"start_step={starts}")
    cfg = lab_config(f"inverter={inverter}", *grid_points, *overrides, model="digits", steps=8, cache=cache)
    return Runner(cfg, digits)


def grid(runner: Runner, n_images: int = 2, edit: bool = True, target: str | None = None):
    """(SampleRows of every grid point of the first images, their prompts): edits to ``target`` (default:
    the source prompt itself) when ``edit``; the blended words are the prompts' last words (the digits)."""
    items = load_items(runner.cfg, runner.model.resolution)[:n_images]
    x0 = runner.model.encode(torch.stack([it.image for it in items]))
    artifacts, _ = runner.artifacts(items, x0)
    rows = list(itertools.product(range(len(items)), runner.points))
    keys = [(i, p.guidance if runner.per_guidance else None) for i, p in rows]
    artifact = {k: torch.stack([artifacts[key][k] for key in keys]) for k in artifacts[keys[0]]}
    guidance = [p.guidance for _, p in rows]
    sources = [items[i].prompt for i, _ in rows]
    targets = [target or s for s in sources]
    batch = SampleRows(
        artifact=artifact,
        cond=runner.cond(targets, guidance),
        source=runner.cond(sources, guidance),
        start=torch.tensor([p.start_step for _, p in rows]),
        edit=torch.full((len(rows),), edit),
    )
    blended = [(s.split()[-1], t.split()[-1]) for s, t in zip(sources, targets, strict=True)]
    prompts = EditPrompts(sources, targets, blended, runner.model.pipe.tokenizer)
    return batch, prompts


def attention_module(cross: bool) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=8, cross_attention_dim=6 if cross else None, heads=2, dim_head=4).eval()


def layout(L: int, **tables) -> Layout:
    """Row 1 is the target of row 0, edited this step; identity tables unless given (1, L)."""
    return Layout(
        target=torch.tensor([1]),
        source=torch.tensor([0]),
        cross=torch.tensor([True]),
        self_attention=torch.tensor([True]),
        token_map=tables.get("token_map", torch.arange(L)[None]),
        aligned=tables.get("aligned", torch.ones(1, L)),
        weight=tables.get("weight", torch.ones(1, L)),
    )


def explicit(attn: Attention, h: torch.Tensor, ctx: torch.Tensor, maps) -> torch.Tensor:
    """The reference computation: heads' attention maps M (B, heads, Q, K) → maps(M) → (maps(M) V) projected."""
    q = attn.to_q(h).view(2, -1, 2, 4).transpose(1, 2)
    k = attn.to_k(ctx).view(2, -1, 2, 4).transpose(1, 2)
    v = attn.to_v(ctx).view(2, -1, 2, 4).transpose(1, 2)
    M = (q @ k.transpose(-1, -2) * 4**-0.5).softmax(-1)
    out = maps(M) @ v[1]  # the target row's values
    return attn.to_out[0](out.transpose(0, 1).reshape(-1, 8))


# -- 1. identity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inverter", ["ddim", "null_text", "edict"])
def test_identical_prompts_with_full_replacement_reproduce_the_reconstruction(digits, p2p_cache, inverter):
    runner = runner_for(digits, p2p_cache, inverter)
    recon_rows, _ = grid(runner, edit=False)
    recon = runner.inverter.sample(runner.denoiser, runner.plan, recon_rows)
    rows, prompts = grid(runner, edit=True)  # target prompt = source prompt
    for mode in ("refine", "replace"):
        editor = make_editor({"name": "p2p", "mode": mode, **FULL})
        paired, take = editor.pair(rows, prompts)
        out, _ = editor.sample_pairs(runner.inverter, runner.denoiser, runner.plan, paired)
        # exactly the reconstruction of the same batch without an editor, bit for bit
        plain = runner.inverter.sample(runner.denoiser, runner.plan, replace(paired, edit=~paired.edit))
        assert torch.equal(out[take], plain[take]), mode
        # the same rows in a batch of half the size: equal up to the network's batch-size rounding
        torch.testing.assert_close(out[take], recon, rtol=0, atol=1e-5)
        sampled = editor.sample(runner.inverter, runner.denoiser, runner.plan, rows, prompts)
        assert torch.equal(sampled, out[take])


# -- 1b. the replacement windows, against the reference's alpha table ---------------------------------------
def reference_window_steps(num_steps: int, cross: float, self_replace: float) -> tuple[list[int], list[int]]:
    """The steps (cur_step) on which google/prompt-to-prompt's controller, built for ``num_steps`` steps,
    replaces cross-attention (``ptp_utils.get_time_words_attention_alpha`` with a float cross_replace_steps:
    ``update_alpha_time_word`` on an α table of num_steps + 1 rows, read at ``alpha[cur_step]``) and
    self-attention (``AttentionControlEdit.num_self_replace``)."""
    alpha = torch.zeros(num_steps + 1, 1, 77)  # (steps + 1, prompts − 1, max words)
    bounds = 0, cross  # a float bound b is (0, b)
    start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
    alpha[:start, 0, :] = 0
    alpha[start:end, 0, :] = 1
    alpha[end:, 0, :] = 0
    self_bounds = 0, self_replace
    num_self_replace = int(num_steps * self_bounds[0]), int(num_steps * self_bounds[1])
    cross_steps = [s for s in range(num_steps) if bool(alpha[s, 0, 0] == 1)]
    self_steps = [s for s in range(num_steps) if num_self_replace[0] <= s < num_self_replace[1]]
    return cross_steps, self_steps


def lab_window_steps(
    num_steps: int, start: int, cross: float, self_replace: float
) -> tuple[list[int], list[int]]:
    """The steps s = i − k of a pair sampled from start step k on which ``PairedDenoiser`` marks the target's
    cross- and self-attention for replacement (the flags the attention processors read)."""
    tok = build_tokenizer(["a", "handwritten", "digit", "three", "eight"])
    editor = make_editor({"name": "p2p", "cross_replace_steps": cross, "self_replace_steps": self_replace})
    cond = toy_cond(1, 1.0, length=tok.model_max_length)
    rows = SampleRows({}, cond, cond, torch.tensor([start]), torch.tensor([True]))
    paired, _ = editor.pair(rows, EditPrompts([SOURCE_PROMPT], [TARGET_PROMPT], [None], tok))
    plan = make_inverter("ddim").plan(sd_scheduler(), num_steps)
    den = PairedDenoiser(None, AttentionControl(), plan, (cross, self_replace), None)
    cross_steps, self_steps = [], []
    for i in range(start, num_steps):
        t = plan.timesteps[i].expand(len(paired.cond))
        layout = den.layout(t, paired.cond, torch.device("cpu"))[0]
        cross_steps += [i - start] if bool(layout.cross[0]) else []
        self_steps += [i - start] if bool(layout.self_attention[0]) else []
    return cross_steps, self_steps


@pytest.mark.parametrize("num_steps", [7, 12, 17, 20, 50])
def test_the_replacement_windows_are_the_references(num_steps):
    """The reference's cross window is int(c · (N + 1)) steps: at N = 12, c = 0.4 that is 5 (⌊c · N⌋ = 4); the
    self window int(N · s). From start step k the pair gets the reference's controller for N − k steps."""
    for cross, self_replace in ((0.4, 0.6), (0.8, 0.4), (0.2, 0.5), (0.29, 0.7), (1.0, 1.0), (0.0, 0.0)):
        for start in (0, 2, 5):
            lab = lab_window_steps(num_steps, start, cross, self_replace)
            assert lab == reference_window_steps(num_steps - start, cross, self_replace), (cross, start)


def test_at_12_steps_the_cross_window_of_0_4_is_5_steps():
    assert lab_window_steps(12, 0, 0.4, 0.6) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6])  # int(5.2), int(7.2)
    assert lab_window_steps(12, 2, 0.4, 0.6) == ([0, 1, 2, 3], [0, 1, 2, 3, 4, 5])  # n = 10: int(4.4), int(6.0)


# -- 2. the attention edits, on the processor ---------------------------------------------------------------
@pytest.mark.parametrize("cross", [True, False])
def test_full_replacement_gives_the_target_its_sources_attention(cross):
    attn = attention_module(cross)
    torch.manual_seed(1)
    h = torch.randn(2, 9, 8)
    ctx = torch.randn(2, 5, 6) if cross else None
    plain = AttnProcessor2_0()(attn, h, ctx)
    control = AttentionControl()
    control.layout = layout(5 if cross else 9)
    edited = P2PAttnProcessor(control)(attn, h, ctx)
    assert torch.equal(edited[0], plain[0])  # the source is untouched
    expected = explicit(attn, h, h if ctx is None else ctx, lambda M: M[0])  # M_target ← M_source
    torch.testing.assert_close(edited[1], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(edited[1], plain[1])


def test_refine_and_reweight_follow_the_reference_formula_on_the_maps():
    attn = attention_module(True)
    torch.manual_seed(2)
    h, ctx = torch.randn(2, 9, 8), torch.randn(2, 5, 6)
    token_map = torch.tensor([[0, 1, 1, 0, 3]])  # token 3 is new: it keeps its own attention
    aligned = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]])
    weight = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]])  # token 2 re-weighted by 3
    control = AttentionControl()
    control.layout = layout(5, token_map=token_map, aligned=aligned, weight=weight)
    edited = P2PAttnProcessor(control)(attn, h, ctx)

    def refined(M: torch.Tensor) -> torch.Tensor:  # w_j (α_j M*[:, map_j] + (1 − α_j) M[:, j])
        return weight * (aligned * M[0][..., token_map[0]] + (1 - aligned) * M[1])

    torch.testing.assert_close(edited[1], explicit(attn, h, ctx, refined), rtol=1e-5, atol=1e-6)
    # re-weighting scales exactly the chosen token's attention: its contribution grows by w − 1 = 2
    control.layout = layout(5, token_map=token_map, aligned=aligned)
    unweighted = P2PAttnProcessor(control)(attn, h, ctx)

    def token2(M: torch.Tensor) -> torch.Tensor:
        only = torch.zeros_like(M[1])
        only[..., 2] = M[0][..., 1]  # token 2 reads source token 1
        return only

    torch.testing.assert_close(
        edited[1] - unweighted[1], 2 * (explicit(attn, h, ctx, token2) - attn.to_out[0].bias)
    )


# -- 3. token alignment -------------------------------------------------------------------------------------
def test_refine_aligns_hand_made_token_sequences():
    assert align([49406, 5, 6, 49407], [49406, 5, 9, 6, 49407]) == [0, 1, -1, 2, 3]  # a word added
    assert align([49406, 5, 6, 49407], [49406, 5, 7, 49407]) == [0, 1, -1, 3]  # a word swapped: new token
    assert align([49406, 5, 6, 8, 49407], [49406, 5, 8, 49407]) == [0, 1, 3, 4]  # a word removed
    token_map, aligned = refine_map([1, 5, 6, 2], [1, 5, 7, 6, 2], 8)
    assert token_map.tolist() == [0, 1, 0, 2, 3, 5, 6, 7]  # past the target's end: the same position
    assert aligned.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="same token count") as err:
        replace_map([1, 5, 2], [1, 5, 6, 2], 8)
    assert "\n" not in str(err.value)


def test_word_tokens_find_a_words_positions():
    tok = build_tokenizer(["a", "handwritten", "digit", "three", "eight"])
    assert word_tokens(SOURCE_PROMPT, "three", tok, 77) == [4]
    assert word_tokens("A handwritten digit, three.", "digit", tok, 77) == [3, 4]  # "digit," = two tokens
    assert word_tokens(SOURCE_PROMPT, "seven", tok, 77) == []
    assert len(token_ids(SOURCE_PROMPT, tok, 77)) == 6  # start, four words, end


# -- 4. local blend ---------------------------------------------------------------------------------------
def test_local_blend_keeps_the_unedited_region_equal_to_the_source(digits, p2p_cache):
    runner = runner_for(digits, p2p_cache, "ddim")
    rows, prompts = grid(runner, target=TARGET_PROMPT)
    # the digits model's word maps are diffuse (0.6–1 of their peak everywhere): a high threshold cuts them
    editor = make_editor({"name": "p2p", "blend_threshold": 0.95})
    paired, _ = editor.pair(rows, prompts)
    out, blend = editor.sample_pairs(runner.inverter, runner.denoiser, runner.plan, paired)
    role, pair = paired.cond.extra["p2p_role"], paired.cond.extra["p2p_pair"]
    masks = []
    for p, mask in blend.masks.items():
        source, target = out[(pair == p) & (role == SOURCE)][0], out[(pair == p) & (role == TARGET)][0]
        outside = ~mask.expand_as(source)
        assert torch.equal(source[outside], target[outside])
        masks.append(mask)
    coverage = torch.stack(masks).float().mean()
    assert 0 < coverage < 1  # a real mask: some pixels edited, some kept
    assert not torch.equal(out[role == SOURCE], out[role == TARGET])


# -- 5. pairs under chunking, every inverter ----------------------------------------------------------------
def test_pairs_survive_chunking(digits, p2p_cache):
    runner = runner_for(digits, p2p_cache, "ddim")
    rows, prompts = grid(runner, n_images=2, target=TARGET_PROMPT)
    rows.edit[1] = False  # one reconstruction rides along unpaired
    editor = make_editor({"name": "p2p"})
    run = [
        editor.sample(runner.inverter, runner.denoiser, runner.plan, rows, prompts, batch_size=b)
        for b in (None, 1, 3, 4)
    ]
    for other in run[1:]:
        torch.testing.assert_close(other, run[0], rtol=0, atol=1e-5)  # the network's batch-size rounding


INVERTERS = ("ddim", "course", "null_text", "negative_prompt", "edict", "bdia", "fixed_point", "edit_friendly")


@pytest.mark.parametrize("inverter", [*INVERTERS, "direct"])
def test_every_inverters_source_row_follows_its_reconstruction(digits, p2p_cache, inverter):
    knobs = ["inverter.skip=2"] if inverter == "edit_friendly" else []
    runner = runner_for(digits, p2p_cache, inverter, *knobs, starts="[3]")
    recon_rows, _ = grid(runner, n_images=1, edit=False)
    recon = runner.inverter.sample(runner.denoiser, runner.plan, recon_rows)
    rows, prompts = grid(runner, n_images=1, target=TARGET_PROMPT)
    editor = make_editor({"name": "p2p"})
    paired, _ = editor.pair(rows, prompts)
    out, _ = editor.sample_pairs(runner.inverter, runner.denoiser, runner.plan, paired)
    role = paired.cond.extra["p2p_role"]
    torch.testing.assert_close(out[role == SOURCE], recon, rtol=0, atol=1e-5)
    assert not torch.allclose(out[role == TARGET], recon)


# -- 6. the engine: rows, accounting, run.json ---------------------------------------------------------------
def test_editor_knobs_enter_rows_and_an_edit_costs_both_trajectories(digits):
    overrides = [
        "data=digits-pie",
        "task=edit",
        "editor=p2p",
        "editor.cross_replace_steps=0.8",
        "guidance_scale=[1,3]",
    ]
    cfg = lab_config(*overrides, "start_step=[4]", model="digits", steps=8)
    validate(cfg)
    runner = Runner(cfg, digits)
    items = load_items(cfg, digits.resolution)[:1]
    runner.set_protocol(items)
    rows, _ = runner.run_group(items)
    assert {r["editor"] for r in rows} == {"p2p"}
    assert {json.loads(r["editor_knobs"])["cross_replace_steps"] for r in rows} == {0.8}
    assert [r["unet_evals"] for r in rows] == [2 * 4 * 1, 2 * 4 * 2]  # target + source, at c = 1 and 2
    assert runner.denoiser.unet_evals == runner.minimum.forwards
    assert runner.summary(1)["editor"]["name"] == "p2p"
    swap = Runner(lab_config(*overrides[:2], "start_step=[4]", model="digits", steps=8), digits)
    assert {r["editor"] for r in swap.run_group(items)[0]} == {"prompt_swap"}


# -- 7. errors -----------------------------------------------------------------------------------------------
def test_replace_with_different_token_counts_is_one_line(digits, p2p_cache):
    runner = runner_for(digits, p2p_cache, "ddim")
    rows, prompts = grid(runner, n_images=1, target="a handwritten digit three eight")
    editor = make_editor({"name": "p2p", "mode": "replace"})
    with pytest.raises(ValueError, match="same token count") as err:
        editor.sample(runner.inverter, runner.denoiser, runner.plan, rows, prompts)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("editor.mode=swap", "mode"),
        ("editor.cross_replace_steps=1.5", "cross_replace_steps"),
        ("editor.blend_words=three", "blend_words"),
        ("+editor.colour=1", "colour"),
    ],
)
def test_bad_editor_config_stops_before_any_model_loads(override, message):
    cfg = lab_config("task=edit", "edit_prompt=a handwritten digit eight", "editor=p2p", override)
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_p2p_needs_an_sd_format_unet():
    class FlowLike:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="SD-format UNet"):
        attention_network(FlowLike())
