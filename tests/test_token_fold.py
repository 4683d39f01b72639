"""Folding identical context tokens (``ddim_lab.engine.token_fold``, used by ``FlowDenoiser``).

- the run detection: the shortest trailing run over rows, bitwise (0.0 and −0.0 differ), nothing below 2;
- on the shipped ``digits-flow`` (256 zero "T5" tokens): the folded transformer is the same function — equal
  to float64 rounding in float64, to 1e-5 in float32 — for different prompts in one batch, CFG's null rows,
  several latents and timesteps; the transformer really sees 16 + 1 context tokens and gets its processors
  back;
- SD3.5's block options (QK-norm, the image-only second attention) on a random float64 transformer;
- where the full context must run: ``tiny-flow`` with its T5 (no run), context embeddings that carry
  gradients, a non-stock attention processor — the output is bitwise the unfolded one;
- end to end: a ``model=digits-flow`` reconstruction gives the same rows and images as without the fold.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from ddim_lab.data.folders import load_dataset
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.flow_denoiser import FlowDenoiser
from ddim_lab.engine.token_fold import fold_trailing_tokens, joint_attentions, trailing_run
from ddim_lab.study.runner import Runner
from tests.conftest import DIGITS, lab_config, model_spec

PROMPTS = ["a handwritten digit three", "digit 7", "the number nine", ""]
GUIDANCE = [1.0, 4.0, 0.0, 2.5]  # prompt only, CFG, null only, CFG
TIMESTEPS = (999.0, 700.0, 300.0, 20.0)
CLIP_TOKENS = 16  # digits-flow's tokenizer length; then 256 zero tokens
TOL = 1e-5


class ContextLengths:
    """Records the context length every transformer call sees (a hook on ``context_embedder``)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.seen: list[int] = []
        self.handle = transformer.context_embedder.register_forward_pre_hook(
            lambda _, args: self.seen.append(args[0].shape[1])
        )

    def __enter__(self) -> ContextLengths:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def velocities(
    denoiser: FlowDenoiser, cond, dtype: torch.dtype = torch.float32, timesteps: tuple[float, ...] = TIMESTEPS
) -> list[torch.Tensor]:
    """The guided velocity (B, C, H, W) at each timestep, on seeded latents (one draw per step)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for t in timesteps:
            x = torch.randn(len(cond), 4, 8, 8, generator=gen, dtype=torch.float64).to(dtype)
            out.append(denoiser.velocity(x, torch.full((len(cond),), t), cond))
    return out


def test_trailing_run_is_the_shortest_bitwise_run_over_rows():
    context = torch.randn(2, 10, 3)
    context[0, 5:] = 1.5  # row 0: a run of 5
    context[1, 7:] = -2.0  # row 1: a run of 3, of another token
    assert trailing_run(context) == 3
    folded, log_counts = fold_trailing_tokens(context)
    assert torch.equal(folded, context[:, :8])
    assert torch.equal(log_counts, torch.tensor([0.0] * 7 + [math.log(3)], dtype=torch.float64))
    context[1, 8:] = 0.0
    assert trailing_run(context) == 2
    context[1, 9] = -0.0
    assert trailing_run(context) == 1  # +0.0 == −0.0 numerically, but not bitwise
    assert fold_trailing_tokens(context) is None
    assert fold_trailing_tokens(torch.randn(3, 6, 4)) is None  # nothing repeats


def test_digits_flow_context_folds_to_one_zero_token(digits_flow):
    cond = digits_flow.conditioning(PROMPTS, GUIDANCE)
    assert cond.text.shape[1] == CLIP_TOKENS + 256
    folded, log_counts = fold_trailing_tokens(torch.cat([cond.text, cond.null]))
    assert folded.shape[1] == CLIP_TOKENS + 1
    assert log_counts[-1] == pytest.approx(math.log(256)) and not log_counts[:-1].any()


def test_folded_digits_flow_is_the_same_function(digits_flow):
    cond = digits_flow.conditioning(PROMPTS, GUIDANCE)
    transformer = digits_flow.network
    stock = [a.processor for a in joint_attentions(transformer)]
    # float32, as the lab runs it: different prompts, CFG and null rows, in one batch
    with ContextLengths(transformer) as lengths:
        folded = velocities(FlowDenoiser(transformer), cond)
    assert lengths.seen == [CLIP_TOKENS + 1] * len(TIMESTEPS)
    assert [a.processor for a in joint_attentions(transformer)] == stock  # processors given back
    full = velocities(FlowDenoiser(transformer, fold_context=False), cond)
    for f, u in zip(folded, full, strict=True):
        scale = float(u.abs().max())  # CFG at g = 4 scales the branches' rounding by up to 2g − 1
        assert float((f - u).abs().max()) <= TOL * max(1.0, scale)  # measured: 3e-5 at |v| ≤ 12
    # the unguided network outputs (guidance 1): 1e-5 absolute
    ones = digits_flow.conditioning(PROMPTS, [1.0] * len(PROMPTS))
    for f, u in zip(
        velocities(FlowDenoiser(transformer), ones),
        velocities(FlowDenoiser(transformer, fold_context=False), ones),
        strict=True,
    ):
        assert float((f - u).abs().max()) <= TOL  # measured: ≤ 7.2e-6
    # float64: the same function up to float64 rounding (Eq. 1 of token_fold is an identity)
    wide = copy.deepcopy(transformer).double()
    cond = digits_flow.conditioning(PROMPTS[:2], GUIDANCE[:2])
    for f, u in zip(
        velocities(FlowDenoiser(wide), cond, torch.float64, TIMESTEPS[1::2]),
        velocities(FlowDenoiser(wide, fold_context=False), cond, torch.float64, TIMESTEPS[1::2]),
        strict=True,
    ):
        assert float((f - u).abs().max()) <= 1e-12 * float(u.abs().max())


def test_fold_is_exact_with_qk_norm_and_dual_attention():
    """SD3.5's blocks (RMS QK-norm, a second image-only attention) on a random float64 transformer, with a run
    of 7 copies of a random, row-specific token after 5 distinct ones."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    ).double()
    text = torch.randn(3, 12, 16, dtype=torch.float64)
    text[:, 5:] = torch.randn(3, 1, 16, dtype=torch.float64)  # rows differ, each repeats its own token
    cond = Conditioning(text, None, torch.ones(3), {"pooled": torch.randn(3, 12, dtype=torch.float64)})
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([950.0, 500.0, 50.0])
    with torch.no_grad(), ContextLengths(transformer) as lengths:
        folded = FlowDenoiser(transformer).velocity(x, t, cond)
        full = FlowDenoiser(transformer, fold_context=False).velocity(x, t, cond)
    assert lengths.seen == [6, 12]
    assert float((folded - full).abs().max()) <= 1e-12 * float(full.abs().max())


def test_the_full_context_runs_where_folding_is_not_exact(digits_flow, cache_dir):
    from ddim_lab.models.loading import load_model

    # SD3 with a real T5: the padding's T5 outputs differ by position, nothing folds, the path is unchanged
    tiny = load_model(model_spec("tiny-flow"), {"device": "cpu"}, cache_dir)
    cond = tiny.conditioning(PROMPTS[:2], [1.0, 3.0])
    assert fold_trailing_tokens(torch.cat([cond.text, cond.null])) is None
    x = torch.randn(2, *tiny.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 400.0])
    with torch.no_grad(), ContextLengths(tiny.network) as lengths:
        on = FlowDenoiser(tiny.network).velocity(x, t, cond)
        off = FlowDenoiser(tiny.network, fold_context=False).velocity(x, t, cond)
    assert torch.equal(on, off) and lengths.seen == [cond.text.shape[1]] * 2
    # digits-flow, embeddings that carry gradients (each copy needs its own) or a non-stock processor
    transformer = digits_flow.network
    cond = digits_flow.conditioning(PROMPTS[:1], [1.0])
    x = torch.randn(1, 4, 8, 8)
    with ContextLengths(transformer) as lengths:
        cond.text.requires_grad_(True)
        FlowDenoiser(transformer).velocity(x, torch.tensor([500.0]), cond).sum().backward()
        cond.text.requires_grad_(False)
        assert (cond.text.grad[0, CLIP_TOKENS:].abs().sum(-1) > 0).all()  # each zero token its own gradient
        stock = [a.processor for a in joint_attentions(transformer)]

        class EditorProcessor(JointAttnProcessor2_0):
            """Stands for an editor's processor: it may mix tokens in ways the fold knows nothing of."""

        joint_attentions(transformer)[2].set_processor(EditorProcessor())
        try:
            with torch.no_grad():
                FlowDenoiser(transformer).velocity(x, torch.tensor([500.0]), cond)
        finally:
            joint_attentions(transformer)[2].set_processor(stock[2])
    assert lengths.seen == [CLIP_TOKENS + 256] * 2


def test_digits_flow_reconstruction_rows_are_unchanged(digits_flow):
    cfg = lab_config("inverter=flow_euler", "guidance_scale=[1,3]", model="digits-flow", steps=6)
    items = load_dataset(DIGITS, digits_flow.resolution, "")[:1]
    results = {}
    for fold in (True, False):
        runner = Runner(cfg, digits_flow)
        runner.denoiser.fold_context = fold
        results[fold] = runner.run_group(items)
    (rows, images), (ref_rows, ref_images) = results[True], results[False]
    assert len(rows) == len(ref_rows) == 2
    timing = {"seconds", "peak_memory_mb"}
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row.keys() == ref.keys()
        for key in row.keys() - timing:
            if isinstance(ref[key], float) and not math.isnan(ref[key]):
                assert row[key] == pytest.approx(ref[key], rel=TOL, abs=TOL), key  # measured: ≤ 3e-7 relative
            elif not (isinstance(ref[key], float) and math.isnan(row[key])):
                assert row[key] == ref[key], key
    assert images.keys() == ref_images.keys()
    for key, value in images.items():
        assert float((value - ref_images[key]).abs().max()) <= TOL, key
