"""Text conditioning of the finetuning step: frozen prompt embeddings, token positions and
the objective's inputs from the drawn signal."""

from __future__ import annotations

import torch

from sepen.architecture import family, text_length
from sepen.finetune.signal import Batch
from sepen.models.loading import is_sdxl
from sepen.objective import StepInputs
from sepen.tokens import prompt_ids


def encode(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    ids = prompt_ids(tokenizer, prompts).to(device)
    with torch.no_grad():
        return text_encoder(ids)[0]


class Positions:
    """Concept token positions of prompts, looked up once per (prompt, concepts) with
    `find(prompt, concepts)`: `sepen.architecture.text_positions` of a pipeline (every token
    copy, e.g. SD3's CLIP and T5 positions) or `concept_token_positions` of one tokenizer."""

    def __init__(self, find):
        self.find = find
        self.cache: dict = {}

    def __call__(self, prompts, concepts) -> list[list[list[int]]]:
        out = []
        for prompt, names in zip(prompts, concepts):
            key = (prompt, tuple(names))
            if key not in self.cache:
                self.cache[key] = self.find(prompt, names)
            out.append(self.cache[key])
        return out


def step_inputs(
    pair: Batch, single: Batch | None, embed, positions, add_noise, device, dtype
) -> StepInputs:
    """The objective's inputs from the drawn signal: noisy latents, timesteps, text conditioning.

    `embed(prompts)` gives (text embeddings, extra conditioning or None), `positions(prompts,
    concepts)` token positions, `add_noise(latents, noise, index)` the noisy latents and the
    denoiser's timesteps (sepen.architecture.Noiser).
    """

    def tensors(b: Batch):
        index = b.timesteps.to(device)
        noisy, t = add_noise(b.latents.to(device), b.noise.to(device), index)
        noisy = noisy.to(dtype)
        emb, added = embed(b.prompts)
        return (noisy, t, emb), added

    (noisy, t, emb), added = tensors(pair)
    single_inputs, single_added = tensors(single) if single is not None else (None, None)
    return StepInputs(
        noisy,
        t,
        emb,
        positions=positions(pair.prompts, pair.concepts),
        single=single_inputs,
        added=added,
        single_added=single_added,
    )


class TextEmbeddings:
    """Frozen text conditioning of one batch of prompts: (embeddings, extra conditioning).

    Stable Diffusion 1.x/2.x: the text encoder's last hidden states, no added conditioning.
    SDXL: the pipeline's own `encode_prompt` (both encoders' penultimate hidden states side by
    side, the second's pooled projection) and the size/crop time ids of a square
    `image_size` image without crop, as SDXL was trained. SD3/SD3.5 and FLUX.1: the pipeline's
    own `encode_prompt` (SD3: CLIP and T5 hidden states in one sequence; FLUX.1: T5) and its
    pooled projection, at the T5 length of `sepen.architecture.text_length`.

    A batch of one repeated prompt (pairs mode) reuses that prompt's conditioning, encoded
    alone once; any other batch is encoded as a whole. Either way a step's conditioning does
    not depend on earlier steps, so a resumed run continues bit-exactly.
    """

    def __init__(self, pipe, device, image_size: int | None = None):
        self.pipe, self.device = pipe, device
        self.kind = family(pipe)
        self.sdxl = is_sdxl(pipe)
        self.image_size = image_size
        self.cache: dict[str, tuple] = {}

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        if self.kind != "unet":
            return self.encode_mmdit(prompts)
        if not self.sdxl:
            return encode(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.device), None
        with torch.no_grad():
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, do_classifier_free_guidance=False
            )
        size = (self.image_size, self.image_size)
        time_ids = self.pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=emb.dtype,
            text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim,
        ).to(self.device)
        return emb, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}

    def encode_mmdit(self, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            length = text_length(self.pipe)
            if self.kind == "sd3":
                emb, _, pooled, _ = self.pipe.encode_prompt(
                    prompts,
                    None,
                    None,
                    device=self.device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=length,
                )
            else:
                emb, pooled, _ = self.pipe.encode_prompt(
                    prompts, None, device=self.device, max_sequence_length=length
                )
        return emb, {"pooled_projections": pooled}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        if len(set(prompts)) > 1:
            return self.encode(prompts)
        prompt = prompts[0]
        if prompt not in self.cache:
            self.cache = {prompt: self.encode([prompt])}
        emb, added = self.cache[prompt]
        n = len(prompts)
        if added is not None:
            added = {k: v.expand(n, *v.shape[1:]) for k, v in added.items()}
        return emb.expand(n, -1, -1), added
