"""The test-time methods, both run by sepen.guidance's one loop (docs/test-time.md):

- `attend_excite`: Attend-and-Excite (Chefer et al. 2023), its loss and published schedule
  (sepen.attend_excite);
- `sepen_test_time`: Separate-and-Enhance's two losses (docs/method.md, Eqs. 1-2) used at
  sampling time the way A&E uses its own loss. The authors published no code for it, so this
  is a reconstruction; its choices (maps, step size, refinement) were made on the toy world's
  card seeds (docs/test-time.md shows the alternatives measured).

`GuidanceMethod.from_config` reads a method's settings; `sample_test_time` draws a batch of
plan entries with it. Positions come from sepen.architecture.text_positions (SDXL: the first
tokenizer; SD3: CLIP and T5 copies, as in finetuning): every sub-token of every concept is a
target. On an MMDiT both read the joint blocks of finetune.blocks; A&E renormalises the
joint maps over the text itself, SepEn at test time reads them as finetune.joint_maps says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sepen.architecture import text_positions
from sepen.attend_excite import attend_excite_loss, attend_excite_schedule, renormalise
from sepen.denoising import check_supported
from sepen.errors import SepenError
from sepen.guidance import Objective, Schedule, check_capture, guided_sample
from sepen.losses import enhance_loss, separate_loss
from sepen.tokens import aggregate_token_maps

METHODS = ("attend_excite", "sepen_test_time")
MAPS = ("raw", "renormalised")


@dataclass(frozen=True)
class SepenTestTime:
    """lambda_sep L_sep + lambda_en L_en on each image's concept maps; the shortfall is L_en.

    maps "raw": the cross-attention probabilities per head, as finetuning reads them;
    "renormalised": heads averaged and the text tokens between start and end token
    renormalised with a softmax of 100x, as Attend-and-Excite reads them.
    """

    lambda_sep: float = 1.0
    lambda_en: float = 0.5
    maps: str = "raw"
    token_aggregation: str = "mean"
    kernel: str = "authors"

    def __post_init__(self) -> None:
        if self.maps not in MAPS:
            raise SepenError(f"sepen_test_time maps = {self.maps!r}: use one of {MAPS}")

    def __call__(self, maps: torch.Tensor, positions) -> tuple[torch.Tensor, torch.Tensor]:
        maps = maps.float()
        if self.maps == "renormalised":
            maps = renormalise(maps.mean(1, keepdim=True))
            positions = [[[p - 1 for p in concept] for concept in s] for s in positions]
        losses, shortfalls = [], []
        for b, groups in enumerate(positions):  # prompts may name different numbers of objects
            concept_maps = aggregate_token_maps(maps[b], groups, self.token_aggregation)[None]
            enhance = enhance_loss(concept_maps, "none", kernel=self.kernel)
            separate = separate_loss(concept_maps, "none")
            losses.append(self.lambda_sep * separate + self.lambda_en * enhance)
            shortfalls.append(enhance)
        return torch.cat(losses), torch.cat(shortfalls)


@dataclass(frozen=True)
class GuidanceMethod:
    """A test-time method's objective, schedule and the maps it reads: a UNet's resolutions,
    an MMDiT's joint blocks and map kind (`capture`, sepen.architecture.capturing)."""

    name: str
    objective: Objective
    schedule: Schedule
    resolutions: tuple[int, ...]
    joint: tuple = (None, "joint")  # (finetune.blocks, joint maps)

    @property
    def capture(self) -> dict:
        blocks, maps = self.joint
        return {"resolutions": list(self.resolutions), "blocks": blocks, "joint_maps": maps}

    @classmethod
    def from_config(cls, name: str, config: dict) -> GuidanceMethod:
        ev, steps = config["evaluation"], config["sampling"]["steps"]
        if name == "attend_excite":
            cfg, ft = ev["attend_excite"], config["finetune"]
            objective: Objective = attend_excite_loss
            resolutions: tuple[int, ...] = (cfg["attention_res"],)
            maps = "joint"  # A&E renormalises over the text tokens itself
        elif name == "sepen_test_time":
            cfg, ft = ev["sepen_test_time"], config["finetune"]
            objective = SepenTestTime(
                ft["lambda_sep"],
                ft["lambda_en"],
                cfg["maps"],
                ft["token_aggregation"],
                ft["enhance_kernel"],
            )
            resolutions = tuple(cfg["resolutions"] or ft["resolutions"])
            maps = ft["joint_maps"]
        else:
            raise SepenError(f"{name!r} is not a test-time method: use one of {METHODS}")
        update_steps, thresholds = attend_excite_schedule(cfg, steps)
        where = f"evaluation.{name}"
        try:
            schedule = Schedule(
                steps, update_steps, cfg["scale_factor"], thresholds, cfg["max_refinement"]
            )
        except SepenError as err:
            raise SepenError(f"{where}: {err}") from None
        blocks = None if ft["blocks"] is None else tuple(ft["blocks"])
        return cls(name, objective, schedule, resolutions, (blocks, maps))

    def positions(self, pipe, entries: Sequence[dict]) -> list[list[list[int]]]:
        """Each entry's concept token positions; a prompt with fewer than two concepts, or a
        concept the tokenizer cannot find, is an error naming it."""
        out = []
        for entry in entries:
            if len(entry["concepts"]) < 2:
                raise SepenError(
                    f"{self.name} needs a prompt with two or more concepts; {entry['prompt']!r} "
                    f"has {entry['concepts']}: name its objects (or sample it with base)"
                )
            out.append(text_positions(pipe, entry["prompt"], entry["concepts"]))
        return out

    def check(self, pipe) -> None:
        """Fail before sampling if the pipeline has no maps where the method reads them."""
        check_supported(pipe)
        key = "attention_res" if self.name == "attend_excite" else "resolutions"
        check_capture(pipe, self.capture, f"evaluation.{self.name}.{key}")

    def sample(self, pipe, entries, positions, seeds, guidance_scale, **kwargs):
        """Images of `entries` (plan prompt entries), image i seeded by seeds[i]."""
        return guided_sample(
            pipe,
            [e["prompt"] for e in entries],
            positions,
            seeds,
            self.objective,
            self.schedule,
            self.capture,
            guidance_scale,
            **kwargs,
        )
