"""Test-time guidance (sepen.guidance) and its two methods (sepen.test_time): Attend-and-Excite
against diffusers' pipeline, latents per step and images, on a tiny random SD 1.x pipeline;
the loop without updates against the pipelines' own sampling (SD 1.x and SDXL); SepEn at test
time on both."""

import dataclasses

import numpy as np
import pytest
import torch

from sepen.config import load_config
from sepen.errors import ConceptNotFoundError, ResolutionError, SepenError
from sepen.guidance import Schedule, guided_sample
from sepen.losses import enhance_loss, separate_loss
from sepen.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from sepen.sampling import sample
from sepen.test_time import GuidanceMethod, SepenTestTime

STEPS = 10


@pytest.fixture(scope="module")
def sd():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl():
    return build_tiny_sdxl_pipeline(seed=0)


def _method(name="attend_excite", steps=STEPS, **settings):
    config = load_config(None)
    config["sampling"]["steps"] = steps
    config["evaluation"][name].update(settings)
    return GuidanceMethod.from_config(name, config)


def _diffusers_attend_excite(sd):
    try:
        from diffusers import StableDiffusionAttendAndExcitePipeline
    except ImportError:
        pytest.skip("this diffusers no longer ships StableDiffusionAttendAndExcitePipeline")
    ae = StableDiffusionAttendAndExcitePipeline.from_pipe(sd)
    ae.set_progress_bar_config(disable=True)
    return ae


ENTRIES = [
    {"prompt": "a cat and a dog", "concepts": ["cat", "dog"]},
    {"prompt": "a photo of a red car and a bird", "concepts": ["red car", "bird"]},
]

# (prompt, seeds, settings): the published schedule at 10 steps (every refinement runs its
# 20 updates on a random model); a large step whose refinement ends after a few updates, at a
# different update for each image of the batch; no refinement at all.
CASES = [
    (0, [0, 1], {"scale_factor": 20, "thresholds": None}),
    (0, [0, 1], {"scale_factor": 3000, "thresholds": {0: 0.0175, 3: 0.0225}}),
    (1, [2, 3, 4], {"scale_factor": 20, "thresholds": {}}),
    (1, [5], {"scale_factor": 3000, "thresholds": {0: 0.0175}, "max_iter_to_alter": 3}),
]


@pytest.mark.parametrize("entry, seeds, settings", CASES)
def test_attend_excite_matches_diffusers_latents_per_step_and_images(sd, entry, seeds, settings):
    ae = _diffusers_attend_excite(sd)
    method = _method(attention_res=8, **settings)
    entry = ENTRIES[entry]
    positions = method.positions(sd, [entry])
    tokens = sorted({p for concept in positions[0] for p in concept})
    assert len(tokens) == len(entry["concepts"]) + (entry["concepts"][0] == "red car")
    theirs = []
    for seed in seeds:
        steps = []
        out = ae(
            [entry["prompt"]],
            token_indices=[tokens],
            attn_res=(8, 8),
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            max_iter_to_alter=method.schedule.update_steps,
            thresholds=method.schedule.thresholds,
            scale_factor=method.schedule.scale_factor,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="np",
            callback=lambda i, t, latents, steps=steps: steps.append(latents.clone()),
        )
        theirs.append((torch.cat(steps), out.images[0]))
    ours, stats = [], {}
    images = method.sample(
        sd,
        [entry] * len(seeds),
        positions * len(seeds),
        seeds,
        7.5,
        on_step=lambda i, t, latents: ours.append(latents.clone()),
        stats=stats,
    )
    assert len(ours) == STEPS
    plain = sample(sd, [entry["prompt"]] * len(seeds), seeds, STEPS, 7.5, output_type="latent")
    for k, (steps, image) in enumerate(theirs):
        mine = torch.stack([latents[k] for latents in ours])
        assert torch.allclose(mine, steps, atol=1e-4), (mine - steps).abs().max()
        np.testing.assert_allclose(images[k], image, atol=1e-4)
        assert (mine[-1] - plain[k]).abs().max() > 1e-3  # the guidance did move the latents
    assert stats["guided_passes"] >= method.schedule.update_steps * len(seeds)


def test_no_update_schedule_is_the_pipelines_own_sampling(sd, xl):
    """With no update and no refinement the loop is plain sampling, SD 1.x and SDXL."""
    for pipe, res in ((sd, 8), (xl, 4)):
        prompts, seeds = ["a cat and a dog", "a photo of a horse and a hat"], [3, 4]
        ours = guided_sample(
            pipe,
            prompts,
            [[[2], [5]], [[5], [8]]],
            seeds,
            lambda maps, pos: (maps.sum((1, 2, 3, 4)), maps.sum((1, 2, 3, 4))),
            Schedule(steps=4, update_steps=0, scale_factor=20, thresholds={}),
            {"resolutions": [res]},
            5.0,
        )
        theirs = sample(pipe, prompts, seeds, 4, 5.0, batch_size=2)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_sepen_test_time_loss_is_the_finetuning_losses_on_raw_or_renormalised_maps():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 4, 4, 12).softmax(-1)  # (B, heads, h, w, T)
    positions = [[[2], [5, 6]], [[3], [7]]]
    raw = SepenTestTime(lambda_sep=1.0, lambda_en=0.5, maps="raw")
    loss, shortfall = raw(maps, positions)
    concept = torch.stack(
        [
            torch.stack([maps[0, ..., 2], maps[0, ..., 5:7].mean(-1)]),
            torch.stack([maps[1, ..., 3], maps[1, ..., 7]]),
        ]
    )  # (B, N, heads, h, w)
    expected_en = enhance_loss(concept, "none")
    torch.testing.assert_close(loss, separate_loss(concept, "none") + 0.5 * expected_en)
    torch.testing.assert_close(shortfall, expected_en)
    renorm = SepenTestTime(maps="renormalised")
    text = (maps.mean(1, keepdim=True)[..., 1:-1] * 100).softmax(-1)
    concept = torch.stack(
        [
            torch.stack([text[0, ..., 1], text[0, ..., 4:6].mean(-1)]),
            torch.stack([text[1, ..., 2], text[1, ..., 6]]),
        ]
    )
    _, shortfall = renorm(maps, positions)
    torch.testing.assert_close(shortfall, enhance_loss(concept, "none"))


@pytest.mark.parametrize("maps", ["raw", "renormalised"])
def test_sepen_test_time_lowers_its_loss_and_samples_on_sd_and_sdxl(sd, xl, maps):
    for pipe, res in ((sd, [8]), (xl, [4])):
        scale = 1e5  # the maps of a random model are nearly flat: a large step to see it move
        method = _method(
            "sepen_test_time",
            steps=4,
            maps=maps,
            resolutions=res,
            scale_factor=scale,
            thresholds={},
        )
        method.check(pipe)
        entry = {"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]}
        positions = method.positions(pipe, [entry] * 2)
        seen = []

        def objective(m, pos, seen=seen, inner=method.objective):
            loss, shortfall = inner(m, pos)
            seen.append(loss.detach())
            return loss, shortfall

        traced = dataclasses.replace(method, objective=objective)
        images = traced.sample(pipe, [entry] * 2, positions, [0, 1], 5.0)
        plain = sample(pipe, [entry["prompt"]] * 2, [0, 1], 4, 5.0)
        assert images.shape == plain.shape and np.isfinite(images).all()
        assert np.abs(images - plain).max() > 1e-4
        assert len(seen) == method.schedule.update_steps == 2


def test_attend_excite_runs_on_sdxl(xl):
    method = _method(
        steps=4, attention_res=4, thresholds={0: 0.9}, max_refinement=2, scale_factor=1e5
    )
    entry = {"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]}
    stats = {}
    images = method.sample(xl, [entry], method.positions(xl, [entry]), [0], 5.0, stats=stats)
    plain = sample(xl, [entry["prompt"]], [0], 4, 5.0)
    assert images.shape == plain.shape and np.abs(images - plain).max() > 1e-4
    assert stats["guided_passes"] == 2 + 2  # 2 update steps, 2 refinement updates at step 0


def test_bad_schedules_and_inputs_name_the_value_and_the_fix(sd):
    with pytest.raises(SepenError, match=r"evaluation.attend_excite: thresholds name steps \[12\]"):
        _method(thresholds={12: 0.5})
    with pytest.raises(SepenError, match=r"max_iter_to_alter = 11 is outside 0..10"):
        _method("sepen_test_time", max_iter_to_alter=11)
    with pytest.raises(ResolutionError, match=r"evaluation.attend_excite.attention_res = \[5\]"):
        _method(attention_res=5).check(sd)
    with pytest.raises(ResolutionError, match=r"set it to some of \[16, 8"):
        _method("sepen_test_time", resolutions=[3]).check(sd)
    method = _method()
    with pytest.raises(SepenError, match="two or more concepts"):
        method.positions(sd, [{"prompt": "a cat", "concepts": ["cat"]}])
    with pytest.raises(ConceptNotFoundError, match="'horse' not found"):
        method.positions(sd, [{"prompt": "a cat and a dog", "concepts": ["cat", "horse"]}])
    with pytest.raises(SepenError, match="maps = 'soft'"):
        SepenTestTime(maps="soft")
