"""SepEn on MMDiT models (SD3, SD3.5-style, FLUX.1) with tiny random pipelines built offline:
the recording processor, what trains, token positions, the norm loss, deltas and LoRA files."""

import copy

import numpy as np
import pytest
import torch

from sepen.architecture import Denoiser, Noiser, install, text_positions
from sepen.delta import apply_delta, read_delta, save_delta, unet_delta_tensors
from sepen.errors import ConceptNotFoundError, DeltaError, ResolutionError
from sepen.joint_attention import install_joint_capture, restore_processors
from sepen.models import load_pipeline
from sepen.objective import SepenObjective, StepInputs
from sepen.trainable import prepare_trainable, trainable_layers

KINDS = ("sd3", "sd35", "flux")
PROMPT = "a photo of a cat and a hippopotamus"


@pytest.fixture(scope="module")
def pipes(tiny_mmdit_models):
    return {k: load_pipeline(path) for k, path in tiny_mmdit_models.items()}


def _call_inputs(pipe, batch=2, seed=0):
    """(noisy latents, timesteps, text sequence, extra) for the denoiser (16x16 latents)."""
    g = torch.Generator().manual_seed(seed)
    channels = pipe.vae.config.latent_channels
    model = pipe.transformer
    text = 9
    emb = torch.randn(batch, text, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, model.config.pooled_projection_dim, generator=g)
    noisy = torch.randn(batch, channels, 16, 16, generator=g)
    return noisy, torch.tensor([700.0, 200.0][:batch]), emb, {"pooled_projections": pooled}


@pytest.mark.parametrize("kind", KINDS)
def test_recording_processor_gives_diffusers_outputs_and_maps_on_the_image_grid(pipes, kind):
    pipe = pipes[kind]
    model, call = pipe.transformer, Denoiser(pipe.transformer)
    args = _call_inputs(pipe)
    with torch.no_grad():
        reference = call(*args)
        store = install_joint_capture(model, None, 16)
        captured = call(*args)
        store.enabled = False
        plain = call(*args)
    restore_processors(model, store)
    torch.testing.assert_close(captured, reference, rtol=0, atol=2e-6)
    assert torch.equal(plain, reference)
    assert len(store.maps) == len(model.transformer_blocks)
    assert store.maps[0].shape == (2, model.config.num_attention_heads, 8, 8, 9)
    mass = store.maps[0].sum(-1)  # image->text share of the joint softmax: below 1
    assert 0 < float(mass.min()) and float(mass.max()) < 1
    with torch.no_grad():
        after = call(*args)  # the previous processors are back
    assert torch.equal(after, reference)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_text_renormalised_maps_sum_to_one_over_the_text(pipes, kind):
    pipe = pipes[kind]
    store = install_joint_capture(pipe.transformer, [0], 16, maps="text")
    try:
        with torch.no_grad():
            Denoiser(pipe.transformer)(*_call_inputs(pipe))
    finally:
        restore_processors(pipe.transformer, store)
    torch.testing.assert_close(store.maps[0].sum(-1), torch.ones(2, 4, 8, 8))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_only_the_joint_blocks_text_keys(tiny_mmdit_models, kind):
    pipe = load_pipeline(tiny_mmdit_models[kind])
    model = pipe.transformer
    ft = {"blocks": None, "joint_maps": "joint"}
    store = install(model, ft, 16)
    params = prepare_trainable(model, trainable_layers(model, store.captured, True), "to_k")
    assert sorted(params) == [
        f"transformer_blocks.{i}.attn.add_k_proj.weight"
        for i in range(len(model.transformer_blocks))
    ]
    noisy, t, emb, extra = _call_inputs(pipe)
    inputs = StepInputs(
        noisy, t, emb, [[[2], [5, 6]], [[3], [7]]], single=(noisy, t, emb), single_added=extra,
        added=extra,
    )  # fmt: skip
    originals = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    parts = SepenObjective(model, store, originals=originals)(inputs)
    parts["loss"].backward()
    grads = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert grads == set(params)
    assert not any(".attn2." in n or "single_transformer_blocks" in n for n in grads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in params)
    assert all(".bias" not in n for n in params)  # biases stay: a LoRA of the weights is exact


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_key_swap_norm_loss_equals_a_frozen_copy_and_restores_the_keys(tiny_mmdit_models, kind):
    pipe = load_pipeline(tiny_mmdit_models[kind])
    model = pipe.transformer
    store = install(model, {"blocks": [0]}, 16)
    params = prepare_trainable(model, trainable_layers(model, store.captured, True), "to_k")
    frozen = copy.deepcopy(model)
    originals = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in params.items()}
    noisy, t, emb, extra = _call_inputs(pipe)
    objective = SepenObjective(model, store, originals=originals)
    single = (noisy, t, emb)
    norm = objective.norm(single, extra, objective.frozen(single, extra)).item()
    store.enabled = False
    with torch.no_grad():
        expected = (
            (Denoiser(model)(*single, extra) - Denoiser(frozen)(*single, extra)).pow(2).mean()
        )
    assert abs(norm - expected.item()) < 1e-7 and expected.item() > 0
    assert all(torch.equal(p, trained[n]) for n, p in params.items())


def test_token_positions_cover_every_copy_of_a_concept(pipes):
    sd3, flux = pipes["sd3"], pipes["flux"]
    clip = sd3.tokenizer(PROMPT).input_ids
    t5 = sd3.tokenizer_3(PROMPT).input_ids
    cat, hippo = text_positions(sd3, PROMPT, ["cat", "hippopotamus"])
    # CLIP: start token at 0, "cat" one token; T5 (from 77): no start token, hippo split in letters
    assert [p for p in cat if p < 77] == [5] and sd3.tokenizer.decode([clip[5]]).strip() == "cat"
    t5_cat = [p - 77 for p in cat if p >= 77]
    assert t5_cat == [4] and sd3.tokenizer_3.convert_ids_to_tokens(t5[4]) == "▁cat"
    t5_hippo = [p - 77 for p in hippo if p >= 77]
    assert len(t5_hippo) == len("hippopotamus")  # letter pieces: ▁h, i, p, ...
    assert (
        "".join(sd3.tokenizer_3.convert_ids_to_tokens([t5[p] for p in t5_hippo])) == "▁hippopotamus"
    )
    assert len([p for p in hippo if p < 77]) >= 2  # CLIP's BPE splits it too
    # FLUX: T5 only, from position 0 (T5 has no start token: "a" is position 0)
    assert text_positions(flux, "cat and dog", ["cat", "dog"]) == [[0], [2]]


def test_a_concept_one_tokenizer_cannot_find_names_that_tokenizer(pipes):
    with pytest.raises(ConceptNotFoundError, match=r"T5 \(tokenizer_3\).*'crème'.*vocabulary"):
        text_positions(pipes["sd3"], "a crème and a cat", ["crème", "cat"])


def test_a_flux_single_stream_block_is_not_a_target(pipes):
    model = pipes["flux"].transformer
    with pytest.raises(ResolutionError, match=r"finetune.blocks \[2\].*single-stream"):
        install(model, {"blocks": [2]}, 16)


def test_flow_matching_noise_follows_the_schedulers_sigmas(pipes):
    noiser = Noiser(pipes["sd3"])
    x, noise = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    noisy, t = noiser(x, noise, torch.tensor([0, 999]))
    sigmas = noiser.scheduler.sigmas[[0, 999]]
    torch.testing.assert_close(noisy.flatten(), 1 - sigmas)
    torch.testing.assert_close(t, noiser.scheduler.timesteps[[0, 999]])


def _perturbed_delta(path, model_dir, seed=0, key_scope=None):
    """A delta of randomly changed text keys (what finetuning writes), and its tensors."""
    pipe = load_pipeline(model_dir)
    model = pipe.transformer
    store = install(model, {"blocks": None, "key_scope": key_scope}, 16)
    if key_scope is None:  # image_queries: the text queries keep the keys of this moment
        restore_processors(model, store)
    store.enabled = False
    params = prepare_trainable(model, trainable_layers(model, store.captured, True), "to_k")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    config = {} if key_scope is None else {"finetune": {"key_scope": key_scope}}
    save_delta(
        path, unet_delta_tensors(model, "to_k"), base_model=str(model_dir), revision=None,
        trainable="to_k", config=config, architecture=type(model).__name__,
    )  # fmt: skip
    return pipe


def _first_block_streams(pipe):
    """The first joint block's (text-stream, image-stream) outputs on fixed inputs."""
    kept = {}
    hook = pipe.transformer.transformer_blocks[0].register_forward_hook(
        lambda module, args, out: kept.update(text=out[0], image=out[1])
    )
    try:
        with torch.no_grad():
            Denoiser(pipe.transformer)(*_call_inputs(pipe))
    finally:
        hook.remove()
    return kept["text"], kept["image"]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_keys_for_the_image_queries_only_keep_the_text_stream(tiny_mmdit_models, tmp_path, kind):
    model_dir = tiny_mmdit_models[kind]
    plain, only = tmp_path / "plain.safetensors", tmp_path / "image_queries.safetensors"
    _perturbed_delta(plain, model_dir)
    trained = _perturbed_delta(only, model_dir, key_scope="image_queries")  # as in training
    base_text, base_image = _first_block_streams(load_pipeline(model_dir))
    changed = load_pipeline(model_dir)
    apply_delta(changed, plain)
    plain_text, plain_image = _first_block_streams(changed)
    assert (plain_text - base_text).abs().max() > 1e-3  # a key change rewrites the text stream
    for pipe in (trained, load_pipeline(model_dir)):
        if pipe is not trained:
            apply_delta(pipe, only)
        text, image = _first_block_streams(pipe)
        torch.testing.assert_close(text, base_text, rtol=0, atol=1e-5)
        torch.testing.assert_close(image, plain_image, rtol=0, atol=1e-5)
    store = install_joint_capture(pipe.transformer, None, 16)  # a capture keeps the scope
    text, _ = _first_block_streams(pipe)
    restore_processors(pipe.transformer, store)
    torch.testing.assert_close(text, base_text, rtol=0, atol=1e-5)
    apply_delta(pipe, plain)  # a plain delta on the same pipeline: every query reads its keys
    torch.testing.assert_close(_first_block_streams(pipe)[0], plain_text, rtol=0, atol=1e-5)


def test_keys_for_the_image_queries_only_export_no_lora_and_train_no_values(
    tiny_mmdit_models, tmp_path
):
    from sepen.architecture import check_capture
    from sepen.errors import ConfigError, SepenError
    from sepen.lora import export_lora

    delta, lora = tmp_path / "delta.safetensors", tmp_path / "lora.safetensors"
    _perturbed_delta(delta, tiny_mmdit_models["sd3"], key_scope="image_queries")
    with pytest.raises(SepenError, match="key_scope: image_queries.*no LoRA file.*key_scope: all"):
        export_lora(delta, lora, "full", "diffusers")
    assert not lora.exists()
    model = load_pipeline(tiny_mmdit_models["sd3"]).transformer
    ft = {"blocks": None, "key_scope": "image_queries", "trainable": "to_k+to_v"}
    with pytest.raises(ConfigError, match="key_scope: image_queries.*to_k\\+to_v.*to_k or lora"):
        check_capture(model, ft, 16)


def _draw(pipe):
    return pipe(
        ["a photo of a cat and a dog"], num_inference_steps=2, guidance_scale=2.0, height=128,
        width=128, generator=torch.Generator().manual_seed(3), output_type="np",
        max_sequence_length=32,
    ).images  # fmt: skip


@pytest.mark.parametrize("kind", ["sd35", "flux"])
def test_delta_round_trip_and_a_delta_for_another_architecture(tiny_mmdit_models, tmp_path, kind):
    delta = tmp_path / "delta.safetensors"
    trained = _perturbed_delta(delta, tiny_mmdit_models[kind])
    tensors, meta = read_delta(delta)
    assert meta["architecture"] == type(trained.transformer).__name__
    fresh = load_pipeline(tiny_mmdit_models[kind])
    apply_delta(fresh, delta)
    named = dict(fresh.transformer.named_parameters())
    assert all(torch.equal(named[k], v) for k, v in tensors.items())
    np_equal = _draw(fresh) == _draw(trained)
    assert np_equal.all()
    other = load_pipeline(tiny_mmdit_models["flux" if kind == "sd35" else "sd3"])
    before = {k: v.clone() for k, v in other.transformer.state_dict().items()}
    with pytest.raises(DeltaError, match=r"trained for a \w+Transformer2DModel.*this pipeline's"):
        apply_delta(other, delta)
    assert all(torch.equal(v, other.transformer.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("kind", "fmt"), [("sd3", "diffusers"), ("flux", "diffusers"), ("flux", "kohya")]
)
def test_lora_file_loaded_by_diffusers_draws_what_the_delta_draws(
    tiny_mmdit_models, tmp_path, kind, fmt
):
    from safetensors.torch import load_file

    from sepen.lora import export_lora

    model_dir = tiny_mmdit_models[kind]
    delta, lora = tmp_path / "delta.safetensors", tmp_path / "lora.safetensors"
    trained = _perturbed_delta(delta, model_dir)
    report = export_lora(delta, lora, "full", fmt, model=str(model_dir))
    assert report["relative_error"]["overall"] < 1e-6
    keys = set(load_file(str(lora)))
    if fmt == "diffusers":
        assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    else:
        up = load_file(str(lora))["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"]
        third = up.shape[0] // 3
        assert up[:third].abs().sum() == 0 and up[2 * third :].abs().sum() == 0
        assert up[third : 2 * third].abs().sum() > 0
    stock = load_pipeline(model_dir)
    assert np.abs(_draw(stock) - _draw(trained)).max() > 1e-3  # the keys changed the images
    stock.load_lora_weights(str(lora))
    np.testing.assert_allclose(_draw(stock), _draw(trained), atol=2e-5)


def test_kohya_has_no_sd3_form(tiny_mmdit_models, tmp_path):
    from sepen.errors import SepenError
    from sepen.lora import export_lora

    delta = tmp_path / "delta.safetensors"
    _perturbed_delta(delta, tiny_mmdit_models["sd3"])
    with pytest.raises(SepenError, match="--format kohya has no SD3 form.*--format diffusers"):
        export_lora(delta, tmp_path / "lora.safetensors", "full", "kohya")
    assert not (tmp_path / "lora.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_mmdit_smoke_config_runs_through_snakemake_to_metrics(tmp_path_factory, tiny_clip, kind):
    import json
    import subprocess
    from pathlib import Path

    import yaml
    from helpers.project import copy_project, snakemake

    from sepen.models.tiny_mmdit import save_tiny_mmdit_pipeline

    project = copy_project(tmp_path_factory.mktemp(kind))
    name = f"config/test/{kind}_smoke.yaml"
    config = yaml.safe_load((project / name).read_text())
    save_tiny_mmdit_pipeline(
        project / config["model"]["pretrained"], "sd35" if kind == "sd3" else kind
    )
    # scored by a tiny random open_clip model (no weights to download)
    layer = project / "config/test/with_clip.yaml"
    clip = {"metrics": ["clip"], "clip": {"model": tiny_clip, "pretrained": None}}
    layer.write_text(yaml.safe_dump({"extends": Path(name).name, "evaluation": clip}))
    snakemake(project, "--configfile", "config/test/with_clip.yaml")
    r = project / "results" / config["experiment"]
    methods = config["evaluation"].get(
        "methods", ["base", "sepen", "attend_excite", "sepen_test_time"]
    )
    for method in methods:
        manifest = json.loads((r / "samples" / method / "shard-0.json").read_text())
        assert manifest["images"] and all(
            Path(project / i["path"]).is_file() for i in manifest["images"]
        )
    metrics = json.loads((r / "metrics.json").read_text())
    overall = metrics["sets"]["overall"]
    assert set(overall) == set(methods)
    assert all(-1 <= overall[m]["clip_full"]["mean"] <= 1 for m in methods)
    delta = next((r / "models").glob("*.safetensors"))
    assert read_delta(delta)[1]["architecture"].endswith("Transformer2DModel")
    for png in ("samples", "losses", "attention"):
        assert (r / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    out = str(r / "l.safetensors")
    proc = subprocess.run(
        ["sepen", "export-lora", "--delta", str(delta), "--rank", "4", "--out", out],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("kind", ["sd35", "flux"])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_mmdit_models, kind):
    results = []
    for checkpointing in (False, True):
        pipe = load_pipeline(tiny_mmdit_models[kind])
        model = pipe.transformer
        store = install(model, {"blocks": [0, 1]}, 16)
        params = prepare_trainable(model, trainable_layers(model, store.captured, True), "to_k")
        if checkpointing:
            model.enable_gradient_checkpointing()
            model.train()
        originals = {n: p.detach().clone() for n, p in params.items()}
        noisy, t, emb, extra = _call_inputs(pipe)
        single = (noisy, t, emb)
        inputs = StepInputs(noisy, t, emb, [[[2], [5, 6]], [[3], [7]]], single, extra, extra)
        parts = SepenObjective(model, store, originals=originals)(inputs)
        parts["loss"].backward()
        results.append((parts, {n: p.grad.clone() for n, p in params.items()}))
    (plain, grads), (checked, grads_checked) = results
    for k in plain:
        torch.testing.assert_close(checked[k], plain[k])
    for n in grads:
        torch.testing.assert_close(grads_checked[n], grads[n], rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads.values())


def _flux_at_128px(pipes):
    """The tiny FLUX.1 [dev] pipeline drawing 128 px (16x16 latents, 8x8 packed tokens)."""
    pipe = pipes["flux"]
    pipe.default_sample_size = 16  # FluxPipeline's own default size too
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux_loop_without_updates_is_fluxpipelines_own_sampling(pipes):
    """FLUX.1: no classifier-free guidance, embedded guidance, packed latents, shifted sigmas;
    with no update and no refinement the loop's latents and images are FluxPipeline's."""
    from sepen.guidance import Schedule, guided_sample
    from sepen.sampling import sample

    pipe = _flux_at_128px(pipes)
    prompts, seeds = ["a cat and a dog", "a photo of a horse and a hat"], [3, 4]
    args = (prompts, [[[1], [3]], [[4], [7]]], seeds)
    flat = (lambda maps, pos: (maps.sum((1, 2, 3, 4)),) * 2, Schedule(3, 0, 20.0))
    latents = {}
    for output in ("latent", "np"):
        ours = guided_sample(pipe, *args, *flat, {"blocks": [0]}, 2.5, output_type=output)
        theirs = sample(pipe, prompts, seeds, 3, 2.5, batch_size=2, output_type=output)
        assert tuple(ours.shape) == tuple(theirs.shape)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-4)
        latents[output] = ours
    # the embedded guidance reaches the model: another scale, other latents
    other = guided_sample(pipe, *args, *flat, {"blocks": [0]}, 6.0, output_type="latent")
    assert (other - latents["latent"]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_sd3_loop_without_updates_is_the_pipelines_own_sampling(pipes, kind):
    """SD3/SD3.5: classifier-free guidance over CLIP + T5 conditioning, flow-matching steps."""
    from sepen.guidance import Schedule, guided_sample
    from sepen.sampling import sample

    pipe = pipes[kind]
    prompts, seeds = ["a cat and a dog", "a photo of a horse and a hat"], [3, 4]
    flat = (lambda maps, pos: (maps.sum((1, 2, 3, 4)),) * 2, Schedule(3, 0, 20.0))
    for guidance in (1.0, 4.0):  # without and with classifier-free guidance
        ours = guided_sample(
            pipe, prompts, [[[1], [3]], [[4], [7]]], seeds, *flat, {"blocks": [0]}, guidance
        )
        theirs = sample(pipe, prompts, seeds, 3, guidance, batch_size=2)
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize(("name", "scale"), [("attend_excite", 1e4), ("sepen_test_time", 1e2)])
def test_test_time_guidance_on_flux_lowers_its_loss_on_the_token_grid(pipes, name, scale):
    """A&E and SepEn at test time on FLUX.1: maps on the unpacked 8x8 token grid with FLUX's
    512 T5 columns; refinement steps on the packed latents lower each image's loss."""
    from sepen.config import validate_config
    from sepen.sampling import sample
    from sepen.test_time import GuidanceMethod

    pipe = _flux_at_128px(pipes)
    settings = {"thresholds": {0: 0.99}, "max_refinement": 4, "scale_factor": scale}
    config = validate_config(
        {"sampling": {"steps": 3}, "evaluation": {name: {**settings, "max_iter_to_alter": 1}}}
    )
    method = GuidanceMethod.from_config(name, config)
    method.check(pipe)
    entry = {"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]}
    positions = method.positions(pipe, [entry] * 2)
    assert positions[0] == [[4], [7]]  # T5 only, no start token
    shapes, seen = [], []

    def objective(maps, pos, inner=method.objective):
        shapes.append(tuple(maps.shape))
        loss, shortfall = inner(maps, pos)
        seen.append(loss.detach().clone())  # (the loop refines A&E's shortfall in place)
        return loss, shortfall

    guided = type(method)(method.name, objective, method.schedule, (), method.joint)
    stats = {}
    images = guided.sample(pipe, [entry] * 2, positions, [0, 1], 3.5, stats=stats)
    assert all(s[2:4] == (8, 8) and s[-1] == 512 for s in shapes)
    first, last = seen[0], seen[-1]  # before the refinement, after its 4 updates
    assert len(seen) == 1 + 4 and stats["guided_passes"] == 2 * 5
    assert (last < first).all(), torch.stack(seen).tolist()
    plain = sample(pipe, [entry["prompt"]] * 2, [0, 1], 3, 3.5)
    assert images.shape == plain.shape == (2, 128, 128, 3)
    assert np.abs(images - plain).max() > 1e-4


def test_test_time_guidance_on_another_pipeline_is_an_error_before_any_work(pipes):
    from diffusers import FluxImg2ImgPipeline

    from sepen.config import validate_config
    from sepen.errors import SepenError
    from sepen.test_time import GuidanceMethod

    method = GuidanceMethod.from_config("attend_excite", validate_config({}))
    img2img = FluxImg2ImgPipeline(**pipes["flux"].components)
    with pytest.raises(SepenError, match="FluxImg2ImgPipeline.*evaluation.methods") as err:
        method.check(img2img)
    assert "\n" not in str(err.value)
    method.check(pipes["sd3"])
    method.check(pipes["flux"])


def test_sepen_test_time_guides_sd3_on_both_token_copies(pipes):
    from sepen.config import validate_config
    from sepen.test_time import GuidanceMethod

    config = validate_config(
        {"sampling": {"steps": 3}, "evaluation": {"sepen_test_time": {"thresholds": {}}}}
    )
    method = GuidanceMethod.from_config("sepen_test_time", config)
    pipe = pipes["sd3"]
    entry = {"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]}
    positions = method.positions(pipe, [entry])
    assert positions[0][0][0] < 77 < positions[0][0][-1]  # the CLIP and the T5 copy
    seen = []

    def objective(maps, pos, inner=method.objective):
        loss, shortfall = inner(maps, pos)
        seen.append(float(loss.sum()))
        return loss, shortfall

    guided = type(method)(method.name, objective, method.schedule, (), method.joint)
    stats = {}
    images = guided.sample(pipe, [entry], positions, [0], 5.0, stats=stats)
    assert images.shape == (1, 128, 128, 3) and stats["guided_passes"] == 1
    assert len(seen) == 1 and seen[0] > 0
