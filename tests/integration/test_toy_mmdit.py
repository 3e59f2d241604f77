"""The toy MMDiT world's model: trained as the SD3 pipeline samples it, pretraining that
survives a stop, and SepEn finetuning on it."""

import copy

import pytest
import torch
import yaml
from helpers.toy import TINY_TOY, write_toy_config
from safetensors.torch import load_file

from sepen.architecture import call_options, text_length
from sepen.config import validate_config
from sepen.models import load_pipeline
from sepen.toy.mmdit import build_toy_mmdit_pipeline, encode_with_grad
from sepen.toy.pretrain import pretrain

PARTS = (
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def mmdit_config(steps=6, every=3):
    cfg = copy.deepcopy(TINY_TOY)
    cfg["toy"]["model"].update(architecture="mmdit", heads=2, head_dim=8, layers=2, text_layers=1)
    cfg["toy"]["pretrain"].update(steps=steps, checkpointing_steps=every, grounding=1.0)
    return validate_config(cfg)


def test_pretraining_encodes_prompts_exactly_as_the_sd3_pipeline_samples_them():
    pipe = build_toy_mmdit_pipeline(mmdit_config()["toy"]["model"])
    prompts = ["a photo of a circle and a star", ""]
    assert text_length(pipe) == pipe.tokenizer_max_length == 16  # no 256 zero T5 tokens
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, **call_options(pipe)
        )
        ours, ours_pooled = encode_with_grad(pipe, prompts)
    assert emb.shape == (2, 32, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(ours, emb) and torch.equal(ours_pooled, pooled)
    assert torch.count_nonzero(emb[:, 16:]) == 0  # the T5 part: zeros of the CLIP length


def test_a_stopped_mmdit_pretraining_resumed_equals_an_uninterrupted_run(tmp_path):
    config = mmdit_config()
    pretrain(config, tmp_path / "full", progress=False)
    state = tmp_path / "run.state"
    assert pretrain(config, tmp_path / "run", progress=False, state_dir=state, stop_after=3) is None
    pretrain(config, tmp_path / "run", progress=False, state_dir=state, resume="latest")
    for part in PARTS:
        a, b = load_file(str(tmp_path / "full" / part)), load_file(str(tmp_path / "run" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    pipe = load_pipeline(tmp_path / "run")  # no T5 in the folder: loads all the same
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    images = pipe(["a photo of a circle"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("maps", ["joint", "text"])
def test_sepen_finetunes_the_toy_mmdit_text_keys(tmp_path, fresh_accelerator_state, maps):
    from sepen.cli.finetune import cli
    from sepen.delta import read_delta

    config = mmdit_config()
    pretrain(config, tmp_path / "base", progress=False)
    cfg = write_toy_config(
        tmp_path / "c.yaml",
        tmp_path / "base",
        joint_maps=maps,
        steps=2,
        concepts=["circle", "star"],
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["toy"] = config["toy"]
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "d.safetensors"
    assert cli(["--config", str(cfg), "--out", str(out), "--cpu"]) == 0
    tensors, meta = read_delta(out)
    assert meta["architecture"] == "SD3Transformer2DModel"
    assert sorted(tensors) == [f"transformer_blocks.{i}.attn.add_k_proj.weight" for i in range(2)]
    base = load_pipeline(tmp_path / "base").transformer.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in tensors.items())
