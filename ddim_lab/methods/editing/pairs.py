"""Edits as (source, target) pairs of rows, sampled in the same network calls: the row layout that
prompt-to-prompt on the UNet (``p2p``) and feature injection on flow transformers (``injection``) share.

Each edit row becomes two adjacent rows: its *source* (the source prompt on the inverter's reconstruction
path, ``edit`` False) and its *target* (the target prompt), with the same artifact row, start step and noise
(a copy of the row's generator each). Pairs come first, unedited rows after. Rows are tagged in
``cond.extra`` under the caller's keys (role, pair id, start step; (B,) long each), so the tags survive
``cond[rows]`` and chunking.
"""

from __future__ import annotations

import torch

from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.methods.inversion.base import SampleRows

SINGLE, SOURCE, TARGET = 0, 1, 2  # roles of a row


def pair_rows(
    rows: SampleRows, keys: tuple[str, str, str]
) -> tuple[SampleRows, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the paired rows, tagged under ``keys`` = (role, pair, start); for each original row the position of its
    result among them; for each new row its original row ``pick`` (B',) and its ``role`` (B',))."""
    edit = rows.edit.cpu()
    edits, singles = edit.nonzero().flatten(), (~edit).nonzero().flatten()
    E = len(edits)
    pick = torch.cat([edits.repeat_interleave(2), singles])  # (B',) original row of each new row
    role = torch.cat([torch.tensor([SOURCE, TARGET]).repeat(E), torch.full((len(singles),), SINGLE)])
    pair = torch.cat([torch.arange(E).repeat_interleave(2), torch.full((len(singles),), -1)])
    take = torch.empty(len(edit), dtype=torch.long)
    take[edits] = 2 * torch.arange(E) + 1
    take[singles] = 2 * E + torch.arange(len(singles))
    is_source = role == SOURCE
    cond = choose(is_source, rows.source[pick], rows.cond[pick])
    device = rows.cond.text.device
    role_key, pair_key, start_key = keys
    cond.extra.update(
        {role_key: role.to(device), pair_key: pair.to(device), start_key: rows.start.cpu()[pick].to(device)}
    )
    generators = None if rows.generators is None else [copy_generator(rows.generators[int(b)]) for b in pick]
    paired = SampleRows(
        artifact={k: v[pick.to(v.device)] for k, v in rows.artifact.items()},
        cond=cond,
        source=rows.source[pick],
        start=rows.start[pick.to(rows.start.device)],
        edit=(edit[pick] & ~is_source).to(rows.edit.device),
        generators=generators,
    )
    return paired, take, pick, role


def choose(first: torch.Tensor, a: Conditioning, b: Conditioning) -> Conditioning:
    """Row r of ``a`` where ``first[r]``, else of ``b``."""

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(first.to(x.device).view(-1, *[1] * (x.dim() - 1)), x, y)

    return Conditioning(
        text=pick(a.text, b.text),
        null=None if a.null is None or b.null is None else pick(a.null, b.null),
        guidance=pick(a.guidance, b.guidance),
        extra={k: pick(a.extra[k], v) for k, v in b.extra.items()},
    )


def copy_generator(generator: torch.Generator) -> torch.Generator:
    """A generator at the same state (a pair's rows draw the same noise, each from its own generator)."""
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
