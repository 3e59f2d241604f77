"""The finetuning signal: prompts and clean latents drawn per optimizer step (docs/method.md,
"Training signal").

The signal needs no images: random clean latents, noise and timesteps. Each optimizer step
draws its whole global batch from a generator seeded by (seed, step), and each process and
micro-step takes its slice, so a run gives the same result for any split of the same global
batch over processes and accumulation steps, and a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sepen.errors import SepenError
from sepen.sampling import sample


def uses_norm_loss(ft: dict) -> bool:
    """The norm loss is on when asked, and by default in joint mode (docs/method.md, Eq. 3)."""
    return ft["norm_loss"] if ft["norm_loss"] is not None else ft["mode"] == "joint"


@dataclass(frozen=True)
class Task:
    """What one finetuning run trains: the `finetune` settings, the prompts of a custom plan
    model (empty: the templates') and whether the norm loss is on."""

    ft: dict
    prompts: tuple[str, ...] = ()
    norm_loss: bool = False

    @classmethod
    def from_settings(cls, ft: dict, prompts=()) -> Task:
        return cls(dict(ft), tuple(prompts), uses_norm_loss(ft))


def _format(template: str, concepts) -> str:
    slots = template.count("{}")
    if slots != len(concepts):
        raise SepenError(
            f"template {template!r} has {slots} '{{}}' slots for {len(concepts)} concepts "
            f"{list(concepts)}: give one '{{}}' per concept"
        )
    return template.format(*concepts)


@dataclass
class Batch:
    prompts: list[str]
    concepts: list[list[str]]
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


class SignalSampler:
    """The training signal, drawn per optimizer step from a seeded generator.

    With no pool, clean latents are random (the paper's image-free signal). With a pool
    (`signal: base_samples`), each sample's prompt and clean latent are drawn from latents the
    base model generated for its prompts.
    """

    def __init__(
        self,
        task: Task,
        latent_shape,
        num_timesteps: int,
        latent_scale: float,
        processes: int,
        pool: dict[str, Batch] | None = None,
    ):
        self.task = task
        ft = self.ft = task.ft
        self.shape = tuple(latent_shape)
        self.num_timesteps = num_timesteps
        self.scale = latent_scale
        self.processes = processes
        self.pool = pool
        self.per_step = ft["batch_size"] * processes * ft["gradient_accumulation_steps"]

    def _noise(self, g: torch.Generator, n: int):
        noise = torch.randn((n, *self.shape), generator=g)
        timesteps = torch.randint(0, self.num_timesteps, (n,), generator=g)
        return noise, timesteps

    def _from_pool(self, g: torch.Generator, kind: str, n: int) -> Batch:
        pool = self.pool[kind]
        idx = torch.randint(0, len(pool.prompts), (n,), generator=g).tolist()
        return Batch(
            [pool.prompts[i] for i in idx],
            [pool.concepts[i] for i in idx],
            pool.latents[idx],
            *self._noise(g, n),
        )

    def prompts(self, g: torch.Generator, n: int, single: bool = False):
        """n (prompt, concepts) draws of the mode's grammar."""
        ft = self.ft
        concepts, templates = ft["concepts"], ft["templates"]
        if single:
            idx = torch.randint(0, len(concepts), (n,), generator=g).tolist()
            return (
                [_format(ft["single_template"], [concepts[i]]) for i in idx],
                [[concepts[i]] for i in idx],
            )
        if ft["mode"] == "pairs":
            own = self.task.prompts
            if own:  # a custom prompt's model: its own prompts (the plan's)
                idx = torch.randint(0, len(own), (n,), generator=g).tolist()
                return [own[i] for i in idx], [list(concepts)] * n
            return [_format(templates[0], concepts)] * n, [list(concepts)] * n
        prompts, picked = [], []
        for _ in range(n):
            i, j = torch.randperm(len(concepts), generator=g)[:2].tolist()
            t = int(torch.randint(0, len(templates), (1,), generator=g))
            picked.append([concepts[i], concepts[j]])
            prompts.append(_format(templates[t], picked[-1]))
        return prompts, picked

    def _draw(self, g: torch.Generator, n: int, single: bool) -> Batch:
        if self.pool is not None:
            return self._from_pool(g, "single" if single else "pair", n)
        prompts, picked = self.prompts(g, n, single)
        latents = torch.randn((n, *self.shape), generator=g) * self.scale
        return Batch(prompts, picked, latents, *self._noise(g, n))

    def step(self, step: int, micro: int, rank: int) -> tuple[Batch, Batch | None]:
        ft, n = self.ft, self.per_step
        g = torch.Generator().manual_seed(ft["seed"] * 1_000_003 + step)
        pair = self._draw(g, n, single=False)
        single = self._draw(g, n, single=True) if self.task.norm_loss else None
        lo = (micro * self.processes + rank) * ft["batch_size"]
        hi = lo + ft["batch_size"]
        return _slice(pair, lo, hi), (_slice(single, lo, hi) if single else None)


def base_sample_pool(
    pipe,
    sampler: SignalSampler,
    size: int,
    sampling: dict,
    seed: int,
    norm_loss: bool,
    show_progress: bool = False,
) -> dict[str, Batch]:
    """Latents the base model generates for `size` prompts of each kind (pair, single)."""
    g = torch.Generator().manual_seed(seed + 7)
    pool = {}
    for kind in ["pair"] + (["single"] if norm_loss else []):
        prompts, concepts = sampler.prompts(g, size, single=kind == "single")
        first = seed + 100_000
        latents = sample(
            pipe,
            prompts,
            range(first, first + size),
            sampling["steps"],
            sampling["guidance_scale"],
            sampling["batch_size"],
            output_type="latent",
            desc=f"signal pool ({kind})" if show_progress else None,
        )
        empty = torch.zeros(0)
        pool[kind] = Batch(prompts, concepts, latents, empty, empty)
    return pool


def _slice(b: Batch, lo: int, hi: int) -> Batch:
    return Batch(
        b.prompts[lo:hi], b.concepts[lo:hi], b.latents[lo:hi], b.noise[lo:hi], b.timesteps[lo:hi]
    )


def check_prompts(find, task: Task) -> None:
    """Fail before any model work if a concept cannot be found in its prompts.

    `find(prompt, concepts)` looks up the positions (`sepen.architecture.text_positions` of the
    pipeline: every tokenizer whose tokens the denoiser sees)."""
    ft = task.ft
    concepts, templates = ft["concepts"], ft["templates"]
    if ft["mode"] == "pairs":
        for prompt in task.prompts or [_format(templates[0], concepts)]:
            find(prompt, concepts)
        return
    if len(set(concepts)) < 2:
        raise SepenError(f"joint mode needs two or more distinct concepts; got {concepts}")
    partner = {c: next(d for d in concepts if d != c) for c in concepts}
    for c in concepts:
        for t in templates:
            for pair in ([c, partner[c]], [partner[c], c]):
                find(_format(t, pair), pair)
        if task.norm_loss:
            find(_format(ft["single_template"], [c]), [c])
