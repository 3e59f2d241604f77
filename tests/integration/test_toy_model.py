import json

import numpy as np
import torch
from helpers.toy import TINY_TOY as TINY
from helpers.toy import write_toy_config
from safetensors.torch import load_file

from sepen.config import validate_config
from sepen.tokens import concept_token_positions
from sepen.toy.model import build_tokenizer
from sepen.toy.world import CONCEPTS, prompt_for


def test_toy_tokenizer_and_token_mapper_agree():
    tok = build_tokenizer()
    for a in CONCEPTS:
        for b in CONCEPTS:
            if a == b:
                continue
            prompt = prompt_for([a, b], "with")
            ids = tok(prompt).input_ids
            pos = concept_token_positions(tok, prompt, [a, b])
            assert [tok.convert_ids_to_tokens(ids[p[0]]) for p in pos] == [a, b]
            assert pos == [[5], [8]]  # <bos> a photo of a A with a B <eos>
    assert tok("A Photo of a CIRCLE").input_ids == tok("a photo of a circle").input_ids
    assert tok("a photo of a unicorn").input_ids[5] == tok.unk_token_id


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    from sepen.toy.pretrain import pretrain

    config = validate_config(TINY)
    pretrain(config, tmp_path / "a", progress=False)
    pretrain(config, tmp_path / "b", progress=False)
    for part in (
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ):
        a = load_file(str(tmp_path / "a" / f"{part}.safetensors"))
        b = load_file(str(tmp_path / "b" / f"{part}.safetensors"))
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    other = validate_config(
        {**TINY, "toy": {**TINY["toy"], "pretrain": {**TINY["toy"]["pretrain"], "seed": 1}}}
    )
    pretrain(other, tmp_path / "c", progress=False)
    c = load_file(str(tmp_path / "c" / "unet/diffusion_pytorch_model.safetensors"))
    a = load_file(str(tmp_path / "a" / "unet/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_pretrained_toy_model_loads_as_a_stable_diffusion_pipeline(tiny_toy_model):
    from sepen.models import load_pipeline
    from sepen.toy.evaluate import generate

    summary = json.loads((tiny_toy_model / "sepen_toy.json").read_text())
    assert len(summary["held_out_pairs"]) == 8
    pipe = load_pipeline(tiny_toy_model)
    prompt = "a photo of a star with a ring"
    assert pipe.tokenizer(prompt).input_ids == build_tokenizer()(prompt).input_ids
    assert pipe.tokenizer.model_max_length == 16
    images = generate(pipe, ["a photo of a circle"] * 2, [0, 0], steps=2, guidance=2.0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[1])  # same seed, same image


def test_sepen_on_the_toy_model_end_to_end(tmp_path, tiny_toy_model):
    """Pretrain (tiny) -> SepEn finetune (joint, norm loss) -> evaluate with paired seeds."""
    from sepen.cli.finetune import main as finetune
    from sepen.cli.finetune import parse_args
    from sepen.cli.toy.evaluate import cli as evaluate_cli
    from sepen.delta import save_delta, unet_delta_tensors
    from sepen.models import load_pipeline
    from sepen.trainable import prepare_trainable, trainable_layers

    cfg = write_toy_config(
        tmp_path / "c.yaml",
        tiny_toy_model,
        concepts=list(CONCEPTS),
        resolutions=[16, 8],
        learning_rate=1e-3,
        log_every=1,
    )
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    delta = finetune(
        parse_args(["--config", str(cfg), "--out", str(tmp_path / "sepen.safetensors"), "--cpu"])
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    assert delta.is_file()
    # a delta that holds the base weights themselves changes nothing: differences are exactly 0
    base = load_pipeline(tiny_toy_model)
    prepare_trainable(base.unet, trainable_layers(base.unet, [], True), "to_k")
    save_delta(
        tmp_path / "same.safetensors",
        unet_delta_tensors(base.unet, "to_k"),
        base_model="base",
        revision=None,
        trainable="to_k",
        config={},
    )
    for name in ("sepen", "same"):
        code = evaluate_cli(
            [
                "--config",
                str(cfg),
                "--model",
                str(tiny_toy_model),
                "--delta",
                str(tmp_path / f"{name}.safetensors"),
                "--images",
                "3",
                "--out",
                str(tmp_path / f"{name}.json"),
                "--grid",
                str(tmp_path / f"{name}.png"),
            ]
        )
        assert code == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert set(same["kinds"]) == {"single", "trained_pairs", "held_out_pairs"}
    for entry in same["kinds"].values():
        assert entry["sepen"]["success"] == entry["base"]["success"]
        assert entry["sepen_minus_base"]["success"]["mean"] == 0.0
    assert (tmp_path / "sepen.png").stat().st_size > 0
