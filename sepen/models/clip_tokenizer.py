"""The real CLIP BPE tokenizer, built offline from the merges that open_clip ships.

Stable Diffusion 1.x uses OpenAI's CLIP tokenizer. Its vocabulary is fully determined by the
BPE merge list: 256 byte symbols, the same 256 with the end-of-word marker, one entry per merge,
then the start and end tokens (49408 entries in all).
"""

from __future__ import annotations

import gzip
from importlib import resources

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2  # merges used by CLIP's tokenizer (the file holds more)
END_OF_WORD = "</w>"


def _byte_symbols() -> list[str]:
    """The stand-in characters of the 256 bytes, in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes follow, mapped to
    code points from 256 upwards (GPT-2's byte-level BPE).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_bpe_merges() -> list[tuple[str, str]]:
    """The first N_MERGES merges of open_clip's `bpe_simple_vocab_16e6.txt.gz`."""
    path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        lines = text.read().split("\n")[1 : N_MERGES + 1]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"unexpected CLIP merge file at {path}; reinstall open_clip_torch")
    return merges  # type: ignore[return-value]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer with Stable Diffusion 1.x's exact token ids.

    SDXL's second tokenizer (OpenCLIP bigG) is the same vocabulary padded with "!".
    """
    merges = clip_bpe_merges()
    return CLIPTokenizer(
        vocab=clip_vocab(merges),
        merges=merges,
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
