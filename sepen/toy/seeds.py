"""The toy world's seed ranges, kept apart so that no reported number is measured on the
seeds a choice was made on.

- evaluation: `evaluation.seed` onwards (the default run: 0-19);
- pretraining's validation: `VALIDATION_SEED` onwards;
- the world card, the settings choices and `sepen toy diagnose`: `toy.card.seed` onwards
  (default `CARD_SEED`);
- the finetuning signal's base-sample pool: `finetune.seed + 100000` onwards.
"""

from __future__ import annotations

VALIDATION_SEED = 10_000
CARD_SEED = 50_000


def seed_range(first: int, n: int) -> list[int]:
    """n consecutive seeds from `first`."""
    return list(range(first, first + n))
