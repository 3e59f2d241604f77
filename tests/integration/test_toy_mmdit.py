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


def test_the_flow_shift_is_the_saved_schedulers_and_a_checkpoint_serves_any_shift(tmp_path, caplog):
    """toy.model.flow_shift goes into the model's scheduler config (the sampling schedule);
    pretraining does not read it, so a checkpoint of shift 1 writes the model of shift 3."""
    config = mmdit_config(steps=2, every=2)
    state = tmp_path / "s"
    pretrain(config, tmp_path / "one", progress=False, state_dir=state)
    shifted = copy.deepcopy(config)
    shifted["toy"]["model"]["flow_shift"] = 3.0
    with caplog.at_level("INFO", logger="sepen.toy.pretrain"):
        pretrain(shifted, tmp_path / "three", progress=False, state_dir=state, resume="latest")
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    one, three = load_pipeline(tmp_path / "one"), load_pipeline(tmp_path / "three")
    assert (one.scheduler.config.shift, three.scheduler.config.shift) == (1.0, 3.0)
    part = PARTS[0]
    a, b = load_file(str(tmp_path / "one" / part)), load_file(str(tmp_path / "three" / part))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint's weights, not retrained
    one.scheduler.set_timesteps(4)
    three.scheduler.set_timesteps(4)
    assert (three.scheduler.sigmas[1:-1] > one.scheduler.sigmas[1:-1]).all()  # more at high noise


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


@pytest.fixture(scope="module")
def toy_mmdit(tmp_path_factory):
    """A tiny toy MMDiT on a 16x16 token grid (patch 1), pretrained for a few steps."""
    config = mmdit_config()
    config["toy"]["model"]["patch_size"] = 1
    path = tmp_path_factory.mktemp("toy_mmdit") / "base"
    pretrain(config, path, progress=False)
    return path


def test_patch_1_gives_a_16x16_token_grid_and_the_text_share_probe_reads_it(toy_mmdit):
    from sepen.joint_attention import install_joint_capture, restore_processors
    from sepen.toy.probes import text_share

    pipe = load_pipeline(toy_mmdit)
    assert pipe.transformer.config.patch_size == 1
    pairs = [["circle", "star"], ["square", "ring"]]
    shares = text_share(pipe, pairs, (6.0, 8.0), 0)
    assert list(shares) == [f"transformer_blocks.{i}.attn" for i in range(2)]
    for layer in shares.values():
        for level in ("0.9", "0.6", "0.3"):
            parts = layer[level]
            assert sum(parts.values()) == pytest.approx(1.0, abs=1e-5)
            assert all(v >= 0 for v in parts.values()) and parts["image"] > 0
    # the maps it read: every image query of the 16x16 grid, every text column
    store = install_joint_capture(pipe.transformer, None, 16, "joint")
    store.columns = None
    emb, _, pooled, _ = pipe.encode_prompt(
        ["a photo of a circle"], None, None, **call_options(pipe)
    )
    with torch.no_grad():
        pipe.transformer(
            hidden_states=torch.randn(1, 4, 16, 16),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
        )
    restore_processors(pipe.transformer, store)
    assert store.maps[0].shape == (1, 2, 16, 16, 32)


def test_swap_test_conditions_on_the_swapped_sequence_and_pooled_vector(toy_mmdit):
    from sepen.sampling import sample
    from sepen.toy.evaluate import to_uint8
    from sepen.toy.probes import swap_images, swap_test

    pipe = load_pipeline(toy_mmdit)
    sampling = {"steps": 2, "guidance_scale": 2.0, "batch_size": 4}
    prompts, seeds = ["a photo of a circle and a star", "a photo of a ring"], [3, 4]
    plain = to_uint8(sample(pipe, prompts, seeds, 2, 2.0))
    images = {
        v: swap_images(pipe, prompts, seeds, sampling, v)
        for v in ("prompt", "sequence_only", "pooled_only")
    }
    assert (images["prompt"] == plain).all()  # the plain variant is the pipeline's sampling
    for variant in ("sequence_only", "pooled_only"):
        assert (images[variant] != plain).any(), variant
    result = swap_test(pipe, [["circle", "star"]], seeds, sampling)
    assert set(result) == {"prompt", "sequence_only", "pooled_only"}
    assert all(0 <= r["success"]["mean"] <= 1 and r["success"]["n"] == 2 for r in result.values())


def _key_delta(path, model_dir, block: int):
    """A delta that changes only joint block `block`'s text-key weights (by 20%)."""
    from sepen.delta import save_delta

    pipe = load_pipeline(model_dir)
    name = f"transformer_blocks.{block}.attn.add_k_proj.weight"
    weight = dict(pipe.transformer.named_parameters())[name].detach()
    return save_delta(
        path,
        {name: weight * 1.2 + 0.05},
        base_model=str(model_dir),
        revision=None,
        trainable="to_k",
        config={},
        architecture="SD3Transformer2DModel",
    )


def test_stream_change_follows_a_key_change_through_the_text_stream(toy_mmdit, tmp_path):
    """A key change in block 0 rewrites block 0's text-stream output (text queries read the
    text keys) and so everything after it; one in the last block (no text output) changes
    only that block's image stream."""
    from sepen.toy.diagnose import stream_change

    prompt = "a photo of a circle and a star"
    first = stream_change(
        load_pipeline(toy_mmdit), _key_delta(tmp_path / "0.st", toy_mmdit, 0), prompt, 0
    )
    assert list(first) == ["block 0", "block 1"]
    assert first["block 0"]["text_stream"] > 1e-4 and first["block 0"]["image_stream"] > 1e-4
    assert first["block 1"]["text_stream"] is None  # SD3's last block drops the text output
    assert first["block 1"]["image_stream"] > 1e-4
    last = stream_change(
        load_pipeline(toy_mmdit), _key_delta(tmp_path / "1.st", toy_mmdit, 1), prompt, 0
    )
    assert last["block 0"] == {"text_stream": 0.0, "image_stream": 0.0}
    assert last["block 1"]["image_stream"] > 1e-4


def test_diagnose_reads_a_toy_mmdits_maps_and_records_its_keys_while_drawing(toy_mmdit, tmp_path):
    """`sepen toy diagnose` on an MMDiT: maps from its joint blocks, the object tokens' key
    cosine recorded while drawing (it changes with the step), and the stream change."""
    from sepen.toy.diagnose import diagnose

    config = mmdit_config()
    config["sampling"]["steps"] = 3
    delta = _key_delta(tmp_path / "0.st", toy_mmdit, 0)
    out = diagnose(config, str(toy_mmdit), str(delta), ["circle", "star"], [0, 1])
    for side in ("base", "sepen"):
        assert -1 <= out[side]["key_cosine"] <= 1 and 0 <= out[side]["map_iou"] <= 1
        assert set(out[side]["attention_budget"]) >= {"start", "circle", "star"}
    assert out["sepen"]["key_cosine"] != out["base"]["key_cosine"]  # block 0's keys changed
    assert out["stream_change"]["block 0"]["text_stream"] > 1e-4
