"""`sepen sample` on the tiny toy model: every image, resumable in fixed batches, stale images
drawn again, the A&E baseline, delta switching."""

import os

import numpy as np
import torch
from helpers.steps import sample_shard
from PIL import Image


def test_sample_writes_every_image_and_a_rerun_generates_only_the_missing_ones(toy_setup):
    first = sample_shard(toy_setup)
    assert first["generated"] == 4 and len(first["images"]) == 4
    paths = [im["path"] for im in first["images"]]
    kept = {p: open(p, "rb").read() for p in paths}
    assert all(Image.open(p).size == (32, 32) for p in paths)
    os.unlink(paths[1])
    with open(paths[2], "wb") as f:  # a half-written image counts as missing
        f.write(kept[paths[2]][:20])
    second = sample_shard(toy_setup)
    assert (second["generated"], second["reused"]) == (2, 2)
    assert second["drawn"] == 3  # the batch of 3 that holds both missing images, whole
    assert {p: open(p, "rb").read() for p in paths} == kept  # same seeds, same images
    assert sample_shard(toy_setup)["generated"] == 0


def test_a_resumed_shard_draws_each_missing_image_in_the_batch_it_had(tmp_path):
    """Images depend on their batch (its size and neighbours change a device's arithmetic);
    here a draw that writes its batch into the pixels shows that a resumed run gives each
    image the batch of the uninterrupted run, draws only the batches holding a missing image,
    and never rewrites a finished one."""
    from sepen.image_store import draw_and_save

    items = [(p, s) for p in ("a", "b", "c") for s in range(3)]
    groups = {"delta-1": items[:5], "delta-2": items[5:]}

    def draw(chunk):  # each image: its batch's size and first item, as pixel values
        first = items.index(chunk[0])
        return [np.full((2, 2, 3), (len(chunk), first, i)) / 255 for i in range(len(chunk))]

    def path_of(item):
        return tmp_path / "run" / f"{item[0]}-{item[1]}.png"

    assert draw_and_save(groups, draw, path_of, 2, "all") == 9
    whole = {p: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert len(whole) == 9
    missing = {items[1], items[4], items[7]}  # batches (0, 1), (4,) and (7, 8)
    for item in missing:
        path_of(item).unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    assert draw_and_save(groups, draw, path_of, 2, "resumed", missing=missing) == 5
    assert {p: p.read_bytes() for p in (tmp_path / "run").iterdir()} == whole
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # kept, not rewritten


def test_images_made_with_other_sampling_settings_are_drawn_again(toy_setup):
    """The README's "a changed config key" row for sampling: a key the images depend on
    discards the kept images of the shard; a key they do not depend on keeps them."""
    paths = [im["path"] for im in sample_shard(toy_setup)["images"]]
    kept = {p: open(p, "rb").read() for p in paths}
    batch = sample_shard(toy_setup, extra=["--set", "sampling.batch_size=1"])
    assert (batch["generated"], batch["reused"]) == (0, 4)
    changed = sample_shard(toy_setup, extra=["--set", "sampling.guidance_scale=7.0"])
    assert (changed["generated"], changed["reused"]) == (4, 0)
    assert all(open(p, "rb").read() != kept[p] for p in paths)
    again = sample_shard(toy_setup)  # back to the first settings: drawn again, equal to the first
    assert again["generated"] == 4
    assert {p: open(p, "rb").read() for p in paths} == kept


def test_attend_excite_baseline_samples_with_the_token_mappers_indices(toy_setup):
    extra = ["--set", "evaluation.methods=[base, attend_excite]"]
    ae = sample_shard(toy_setup, "attend_excite", extra)
    base = sample_shard(toy_setup, "base", extra)
    assert ae["generated"] == 4 and [im["seed"] for im in ae["images"]] == [0, 1, 0, 1]
    # the same prompts and seeds, but the latents were updated: the images differ
    differ = [
        not np.array_equal(np.asarray(Image.open(a["path"])), np.asarray(Image.open(b["path"])))
        for a, b in zip(ae["images"], base["images"])
    ]
    assert any(differ)


def test_changed_sampling_settings_make_kept_images_stale(toy_setup):
    sample_shard(toy_setup)
    assert sample_shard(toy_setup, extra=["--set", "sampling.steps=3"])["generated"] == 4


def test_sepen_sampling_without_its_delta_fails_before_loading_the_model(toy_setup, capsys):
    from sepen.cli.sample import cli

    d = toy_setup["dir"]
    args = ["--config", str(toy_setup["config"]), "--plan", str(toy_setup["plan_path"])]
    args += ["--method", "sepen", "--images-dir", str(d / "s"), "--out", str(d / "s.json")]
    assert cli([*args, "--deltas-dir", str(d / "models")]) == 2
    assert "joint.safetensors" in capsys.readouterr().err
    assert not (d / "s").exists()


def test_delta_switcher_restores_the_base_weights(tiny_toy_model, tmp_path):
    from sepen.delta import save_delta
    from sepen.models import load_pipeline
    from sepen.pipelines import DeltaSwitcher

    pipe = load_pipeline(tiny_toy_model)
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    params = dict(pipe.unet.named_parameters())
    base = params[name].detach().clone()
    path = save_delta(
        tmp_path / "d.safetensors",
        {name: torch.ones_like(base)},
        base_model="toy",
        revision=None,
        trainable="to_k",
        config={},
    )
    switcher = DeltaSwitcher(pipe)
    switcher.use(path)
    assert torch.equal(params[name], torch.ones_like(base))
    switcher.use(None)
    assert torch.equal(params[name], base)
