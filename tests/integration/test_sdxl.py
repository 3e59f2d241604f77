"""SepEn on Stable Diffusion XL, tested on a tiny random SDXL pipeline built from configs:
two text encoders, the pooled embedding and size/crop time ids, SDXL's attention layout."""

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.models.attention_processor import AttnProcessor2_0

from sepen.attention import available_resolutions, install_capture
from sepen.objective import SepenObjective, StepInputs
from sepen.trainable import prepare_trainable, trainable_layers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from sepen.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", sdxl=True)


@pytest.fixture()
def xl(tiny_sdxl):
    from sepen.models import load_pipeline

    return load_pipeline(tiny_sdxl)


def _inputs(pipe, batch=2, seed=0, single=False):
    """A micro-batch with SDXL's real text conditioning (both encoders, pooled, time ids)."""
    from sepen.finetune.conditioning import TextEmbeddings

    g = torch.Generator().manual_seed(seed)
    side = pipe.unet.config.sample_size
    embed = TextEmbeddings(pipe, "cpu", image_size=side * 8)
    prompts = ["a photo of a cat and a dog", "a photo of a horse with a hat"][:batch]

    def draw():
        x = torch.randn(batch, 4, side, side, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        emb, added = embed(prompts)
        return (x, t, emb), added

    (x, t, emb), added = draw()
    single_inputs, single_added = draw() if single else (None, None)
    positions = [[[5], [8]], [[5], [8]]][:batch]
    return StepInputs(x, t, emb, positions, single_inputs, added, single_added)


def test_sdxl_loads_with_both_encoders_and_attention_at_two_levels(xl):
    from sepen.models.loading import is_sdxl

    assert type(xl).__name__ == "StableDiffusionXLPipeline" and is_sdxl(xl)
    levels = available_resolutions(xl.unet, 16)
    # like SDXL at 1024 px (128 latents: attention at 64 and 32, none at 128): here 8 and 4
    assert sorted(levels) == [4, 8]
    assert len(levels[4]) > len(levels[8])  # the coarser level holds most layers


def test_conditioning_concatenates_both_encoders_and_adds_pooled_and_time_ids(xl):
    x = _inputs(xl)
    assert x.emb.shape == (2, 77, 64)  # 32 + 32: the two encoders' hidden states side by side
    assert x.added["text_embeds"].shape == (2, 32)
    assert x.added["time_ids"].tolist() == [[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2
    # computed here from the two encoders, as SDXL was trained: each encoder's penultimate
    # hidden states side by side, and the second encoder's projected pooled output
    hidden = []
    with torch.no_grad():
        for tokenizer, encoder in (
            (xl.tokenizer, xl.text_encoder),
            (xl.tokenizer_2, xl.text_encoder_2),
        ):
            ids = tokenizer(
                "a photo of a cat and a dog",
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2][0])
    assert torch.allclose(torch.cat(hidden, -1), x.emb[0], atol=1e-6)
    assert torch.allclose(out.text_embeds[0], x.added["text_embeds"][0], atol=1e-6)
    assert not torch.allclose(out.last_hidden_state[0], hidden[1], atol=1e-3)  # not the last


def test_capture_equals_diffusers_processor_on_sdxl(xl):
    unet = xl.unet
    x = _inputs(xl)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        reference = unet(x.noisy, x.timesteps, x.emb, added_cond_kwargs=x.added).sample
    store = install_capture(unet, [8, 4])
    with torch.no_grad():
        ours = unet(x.noisy, x.timesteps, x.emb, added_cond_kwargs=x.added).sample
    assert (ours - reference).abs().max().item() <= 1e-5
    assert len(store.maps) == len(store.captured) == 11


def test_token_positions_of_both_tokenizers_agree_on_the_papers_prompts():
    from sepen.config import load_config
    from sepen.models import build_clip_tokenizer
    from sepen.plan import build_plan
    from sepen.tokens import concept_token_positions

    first, second = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    assert first("a cat", padding="max_length", max_length=6).input_ids[-1] == 49407
    assert second("a cat", padding="max_length", max_length=6).input_ids[-1] == 0
    checked = 0
    for name in ("sdxl_pairs", "sdxl_joint"):
        plan = build_plan(load_config(ROOT / f"config/{name}.yaml"))
        for entry in plan["prompts"].values():
            a = concept_token_positions(first, entry["prompt"], entry["concepts"])
            b = concept_token_positions(second, entry["prompt"], entry["concepts"])
            assert a == b, entry["prompt"]
            checked += 1
    assert checked == 276 + 200


def test_gradient_reaches_only_the_trained_keys_and_the_norm_loss_is_the_key_swap(xl):
    unet = xl.unet
    store = install_capture(unet, [4])
    layers = trainable_layers(unet, store.captured, norm_loss=True)
    params = prepare_trainable(unet, layers, "to_k")
    originals = {n: p.detach().clone() for n, p in params.items()}
    frozen = copy.deepcopy(unet).requires_grad_(False)
    with torch.no_grad():  # move the keys away from the originals, as training does
        for p in params.values():
            p.add_(0.5 * torch.randn_like(p))
    moved = {n: p.detach().clone() for n, p in params.items()}
    x = _inputs(xl, single=True)
    objective = SepenObjective(unet, store, originals=originals)
    parts = objective(x)
    parts["loss"].backward()
    trained = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert (
        trained and trained <= set(params) and all(n.endswith("attn2.to_k.weight") for n in trained)
    )
    # the key-swap frozen prediction equals a frozen copy of the original UNet
    noisy, t, emb = x.single
    with torch.no_grad():
        store.enabled = False
        pred = unet(noisy, t, emb, added_cond_kwargs=x.single_added).sample
        expected = pred - frozen(noisy, t, emb, added_cond_kwargs=x.single_added).sample
        store.enabled = True
    assert parts["norm"].item() == pytest.approx(expected.pow(2).mean().item(), rel=1e-4)
    # after the swap the UNet holds the moved keys again (copies taken before the step)
    now = dict(unet.named_parameters())
    assert all(torch.equal(now[n], moved[n]) for n in params)
    assert all(not torch.equal(moved[n], originals[n]) for n in params)


def test_sdxl_finetune_and_delta_round_trip(tiny_sdxl, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from sepen.cli.finetune import main, parse_args
    from sepen.delta import apply_delta
    from sepen.models import load_pipeline
    from sepen.sampling import sample

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"pretrained": str(tiny_sdxl)},
                "finetune": {
                    "steps": 2,
                    "batch_size": 2,
                    "image_size": 128,
                    "resolutions": [4],
                    "learning_rate": 1e-3,
                    "log_every": 1,
                },
            }
        )
    )
    import sepen.cli.finetune

    trained = {}  # the trained parameters as the loop leaves them, copied before any saving
    agree = sepen.cli.finetune.check_ranks_agree

    def keep(accelerator, params):
        trained.update({n.removeprefix("module."): p.detach().clone() for n, p in params.items()})
        return agree(accelerator, params)

    monkeypatch.setattr(sepen.cli.finetune, "check_ranks_agree", keep)
    AcceleratorState._reset_state(reset_partial_state=True)
    delta = main(
        parse_args(["--config", str(cfg), "--out", str(tmp_path / "d.safetensors"), "--cpu"])
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    with open(tmp_path / "d.state" / "losses.csv") as f:
        assert len(f.read().splitlines()) == 3  # header + 2 steps
    a, b = load_pipeline(tiny_sdxl), load_pipeline(tiny_sdxl)
    base = {n: p.detach().clone() for n, p in b.unet.named_parameters()}
    apply_delta(a, delta)
    applied = dict(a.unet.named_parameters())
    assert set(load_file(str(delta))) == set(trained) and trained
    assert all(n.endswith("attn2.to_k.weight") for n in trained)
    for n, p in applied.items():  # the trained keys exactly, every other weight untouched
        assert torch.equal(p, trained[n] if n in trained else base[n]), n
    assert all(not torch.equal(trained[n], base[n]) for n in trained)
    before = sample(b, ["a photo of a cat and a dog"], [0], 2, 5.0, 1)
    params = dict(b.unet.named_parameters())
    with torch.no_grad():
        for n, v in trained.items():
            params[n].copy_(v)
    images = [sample(p, ["a photo of a cat and a dog"], [0], 2, 5.0, 1) for p in (a, b)]
    assert np.abs(images[0] - images[1]).max() <= 1e-5
    assert np.abs(images[0] - before).max() > 0  # the delta changed the images


@pytest.mark.slow
def test_sdxl_smoke_config_runs_through_snakemake(tmp_path_factory):
    from helpers.project import copy_project, snakemake

    from sepen.models.tiny import save_tiny_pipeline

    project = copy_project(tmp_path_factory.mktemp("sdxl"))
    config = yaml.safe_load((project / "config/test/sdxl_smoke.yaml").read_text())
    save_tiny_pipeline(project / config["model"]["pretrained"], sdxl=True)
    snakemake(project, "--configfile", "config/test/sdxl_smoke.yaml")
    r = project / "results" / config["experiment"]
    methods = ("base", "sepen", "attend_excite", "sepen_test_time")
    for method in methods:
        manifest = json.loads((r / "samples" / method / "shard-0.json").read_text())
        assert manifest["images"] and all(
            Path(project / i["path"]).is_file() for i in manifest["images"]
        )
    # the test-time methods draw the multi-object prompts (all of them here) with base's seeds
    guided = json.loads((r / "samples" / "sepen_test_time" / "shard-0.json").read_text())
    base = json.loads((r / "samples" / "base" / "shard-0.json").read_text())
    key = [(i["prompt_id"], i["seed"]) for i in guided["images"]]
    assert key == [(i["prompt_id"], i["seed"]) for i in base["images"]]
    assert guided["drawn"] == len(key) and guided["seconds"] > 0
    for png in ("samples", "losses", "attention"):
        assert (r / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    delta = next((r / "models").glob("*.safetensors"))
    proc = subprocess.run(
        [
            "sepen",
            "export-lora",
            str(delta),
            "--rank",
            "4",
            "--out",
            str(tmp_path_factory.mktemp("l") / "l.safetensors"),
        ],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
