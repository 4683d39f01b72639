"""Token bookkeeping of prompt-to-prompt (Hertz et al. 2022, §3.2): which source token each target token
reads, and where a word sits in a tokenized prompt.

- **replace** (token-for-token swap, e.g. "a cat" → "a dog"): both prompts have the same token count and
  target token j reads source token j.
- **refine** (words added or removed, e.g. "a house" → "a wooden house"): a global alignment of the two
  token sequences (Needleman–Wunsch with match +1, mismatch −1, gap 0, ties broken towards a gap in the
  source, then a gap in the target, as the reference ``seq_aligner``). Target token j reads its aligned
  source token (α_j = 1); a target token without a counterpart keeps its own attention (α_j = 0). Positions
  past the target's end-of-text token read the same position of the source (the reference's padding rule).
- **word tokens**: the positions of a whitespace-separated word's tokens in a prompt (start-of-text is
  position 0), as the reference's ``get_word_inds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MATCH, MISMATCH, GAP = 1, -1, 0
_LEFT, _UP, _DIAG = 1, 2, 3  # traceback moves: a target token alone, a source token alone, a pair
PUNCTUATION = ".,;:!?\"'()"


def token_ids(prompt: str, tokenizer: Any, length: int) -> list[int]:
    """The token ids of ``prompt`` with start- and end-of-text, cut to ``length`` (the text encoder's)."""
    return list(tokenizer(prompt, truncation=True, max_length=length).input_ids)


def align(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """For each target token, the index of the source token aligned with it, or −1 (a global alignment)."""
    n, m = len(source), len(target)
    # 1. scores of the best alignment of source[:i] and target[:j]; gaps cost 0, so row and column 0 stay 0
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[_LEFT] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        move[i][0] = _UP
        for j in range(1, m + 1):
            left = score[i][j - 1] + GAP
            up = score[i - 1][j] + GAP
            diag = score[i - 1][j - 1] + (MATCH if source[i - 1] == target[j - 1] else MISMATCH)
            score[i][j] = max(left, up, diag)
            move[i][j] = _LEFT if score[i][j] == left else _UP if score[i][j] == up else _DIAG
    # 2. trace back from the end: pairs map, lone target tokens stay −1
    out = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            out[j] = i
        elif step == _LEFT:
            j -= 1
        else:
            i -= 1
    return out


def refine_map(source: Sequence[int], target: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_map (length,) long, aligned (length,) float) of refine: target token j reads source token
    ``token_map[j]`` where ``aligned[j]`` is 1; 0 marks a target token with no source counterpart."""
    pairs = align(source, target)
    token_map = torch.arange(length)  # past the target's tokens: the same position (reference padding rule)
    aligned = torch.ones(length)
    for j, i in enumerate(pairs[:length]):
        token_map[j] = max(i, 0)
        aligned[j] = float(i >= 0)
    return token_map, aligned


def replace_map(source: Sequence[int], target: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_map, aligned) of replace: the identity; the prompts must have the same token count."""
    if len(source) != len(target):
        raise ValueError(
            "editor=p2p mode=replace needs source and target prompts of the same token count"
            f" ({len(source) - 2} vs {len(target) - 2} tokens); use editor.mode=refine"
        )
    return torch.arange(length), torch.ones(length)


def _bare(word: str) -> str:
    return word.strip(PUNCTUATION).lower()


def word_tokens(prompt: str, word: str, tokenizer: Any, length: int) -> list[int]:
    """Positions (start-of-text = 0) of the tokens of every whitespace word of ``prompt`` equal to ``word``
    (case and surrounding punctuation ignored); [] when the word is not in the prompt."""
    out, position = [], 1
    for piece in prompt.split():
        count = len(tokenizer(piece, add_special_tokens=False).input_ids)
        if _bare(piece) == _bare(word):
            out.extend(p for p in range(position, position + count) if p < length - 1)
        position += count
    return out
