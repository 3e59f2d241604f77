"""A small T5 tokenizer built in memory, for the tiny SD3 and FLUX.1 pipelines of the tests.

The real T5 tokenizer is a SentencePiece unigram model that no code here can download. This
one has the same special tokens (pad 0, end 1, unknown 2, no start token), the same word-start
marker ("▁") and the same unigram algorithm, with a small vocabulary: whole words for common
prompt words and object names, and single letters and digits for everything else, so an
unlisted word splits into several sub-tokens (as rare words do in T5) and a character outside
it becomes the unknown token.
"""

from __future__ import annotations

import string

WORDS = (
    "a an the photo of and with on in".split()
    + "cat dog bear teddy frog bird horse turtle monkey elephant lion rabbit mouse".split()
    + "car bench bowl apple balloon chair clock crown glasses suitcase".split()
    + "circle square triangle star diamond cross ring bar".split()
    + "red blue green yellow black white".split()
)
T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def t5_vocab(words=WORDS) -> list[tuple[str, float]]:
    """(piece, log-probability) of the unigram model; specials first, as in T5."""
    pieces = [(t, 0.0) for t in T5_SPECIAL]
    pieces += [(f"▁{w}", -2.0) for w in dict.fromkeys(words)]
    pieces += [("▁", -6.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(f"▁{c}", -5.5) for c in string.ascii_lowercase + string.digits]
    return pieces


def build_t5_tokenizer(model_max_length: int = 256, words=WORDS):
    """A fast `T5TokenizerFast` with the vocabulary of `t5_vocab(words)`."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(words), extra_ids=0, model_max_length=model_max_length)
