"""An offline CLIP tokenizer whose BPE merges spell a fixed word list.

Real CLIP merges cannot be downloaded here, so small models carry their own: every byte is a token (so any
text tokenizes), and each listed word gets merges that build it into a single token.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPTokenizer, T5TokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context; without it the SD pipeline pads to 1e30


def build_tokenizer(words: Iterable[str]) -> CLIPTokenizer:
    """A byte-level BPE tokenizer in which every word of ``words`` is one token."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [BOS, EOS, *symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        encoded = "".join(bytes_to_unicode()[b] for b in word.encode("utf-8"))
        pieces = [*encoded[:-1], encoded[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = (left, right)
            left = left + right
            if left not in vocab:
                vocab[left] = len(vocab)
                merges.append(merge)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


T5_MAX_LENGTH = 512  # FluxPipeline's longest T5 prompt


def build_t5_tokenizer(words: Iterable[str]) -> T5TokenizerFast:
    """An offline T5 (Unigram) tokenizer: each word of ``words`` is one piece, any other text falls back to
    its characters (those of the words) or <unk>."""
    words = sorted({w.lower() for w in words})
    chars = sorted(set("".join(words)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
