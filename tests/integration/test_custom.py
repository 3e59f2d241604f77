"""From your own prompts to a fixed model in the tools people use: custom prompt files,
`sepen generate`, LoRA export (diffusers and kohya), `sepen models`, the README's commands."""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sepen.config import load_config
from sepen.delta import apply_delta, save_delta
from sepen.errors import ConfigError, ModelNotAvailableError, SepenError
from sepen.plan import build_plan, read_custom_prompts

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- custom prompt files


def _custom_config(path, prompts, mode="pairs"):
    cfg = {"evaluation": {"prompts": "custom", "prompt_file": str(prompts)}}
    cfg["finetune"] = {"mode": mode}
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_custom_yaml_finds_concepts_from_the_vocabulary_or_takes_them_given(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "vocabulary": ["cat", "dog", "hat", "bench"],
                "prompts": [
                    "a cat and a dog",
                    {"prompt": "a dog wearing a red hat", "concepts": ["dog", "hat"]},
                    "a cat, a dog and a bench",
                ],
            }
        )
    )
    sets = read_custom_prompts(str(f))
    assert sets == {
        "custom": [
            ("a cat and a dog", ["cat", "dog"]),
            ("a dog wearing a red hat", ["dog", "hat"]),
            ("a cat, a dog and a bench", ["cat", "dog", "bench"]),
        ]
    }
    plan = build_plan(_custom_config(tmp_path / "c.yaml", f))
    # per pair: one model per concept tuple, trained on its own prompts (three objects too)
    assert sorted(m["concepts"] for m in plan["models"].values()) == [
        ["cat", "dog"],
        ["cat", "dog", "bench"],
        ["dog", "hat"],
    ]
    three = next(m for m in plan["models"].values() if len(m["concepts"]) == 3)
    assert three["prompts"] == ["a cat, a dog and a bench"]
    joint = build_plan(_custom_config(tmp_path / "j.yaml", f, mode="joint"))
    assert list(joint["models"]) == ["joint"]
    assert joint["models"]["joint"]["concepts"] == ["cat", "dog", "hat", "bench"]


def test_custom_csv_with_sets(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text(
        "prompt,concepts,set\n"
        "a photo of a cat and a dog,cat;dog,animals\n"
        '"a turtle with a balloon, at noon",turtle;balloon,mixed\n'
    )
    assert read_custom_prompts(str(f)) == {
        "animals": [("a photo of a cat and a dog", ["cat", "dog"])],
        "mixed": [("a turtle with a balloon, at noon", ["turtle", "balloon"])],
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ({"prompts": [{"prompt": "a cat", "concepts": ["dog"]}]}, "concept 'dog' is not a whole"),
        ({"vocabulary": ["cat"], "prompts": ["a tree"]}, "names no concept of the vocabulary"),
        ({"prompts": {"empty": []}}, "prompt set 'empty' is empty"),
        ({"vocabulary": ["cat"]}, "has no 'prompts:' list"),
        ({"prompts": [42]}, "is neither a prompt nor"),
    ],
)
def test_bad_custom_prompt_files_are_named(tmp_path, content, message):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_custom_prompts(str(f))


def test_custom_example_config_plans_its_prompts():
    plan = build_plan(load_config(ROOT / "config/custom_example.yaml"))
    assert set(plan["sets"]) == {"pairs", "three_objects"}
    assert any(len(m["concepts"]) == 3 for m in plan["models"].values())


# ---------------------------------------------------------------- generate


def _delta(model_dir, pipe, concepts, mode="pairs", seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        n: p.detach() + 0.05 * torch.randn(p.shape, generator=g)
        for n, p in pipe.unet.named_parameters()
        if n.endswith("attn2.to_k.weight")
    }
    config = {"finetune": {"concepts": concepts, "mode": mode}}
    name = "+".join(concepts) if mode == "pairs" else "joint"
    return save_delta(
        model_dir / f"{name}.safetensors",
        tensors,
        base_model=str(pipe.name_or_path),
        revision=None,
        trainable="to_k",
        config=config,
    )


@pytest.fixture()
def sd(tiny_model):
    from sepen.models import load_pipeline

    pipe = load_pipeline(tiny_model)
    assert pipe.name_or_path == str(tiny_model)
    return pipe


def _generate(*argv):
    from sepen.cli.generate import cli

    return cli([*map(str, argv), "--set", "sampling.steps=2", "--set", "sampling.batch_size=3"])


def test_generate_picks_each_prompts_delta_from_a_folder(tmp_path, sd, capsys):
    from sepen.cli.generate import choose_delta, delta_concepts

    deltas = tmp_path / "deltas"
    cat_dog = _delta(deltas, sd, ["cat", "dog"])
    _delta(deltas, sd, ["dog", "hat"], seed=1)
    found = {p: delta_concepts(p) for p in deltas.glob("*.safetensors")}
    assert choose_delta("a photo of a dog and a cat", found) == cat_dog
    out = tmp_path / "images"
    prompts = ["a photo of a cat and a dog", "a dog wearing a hat"]
    args = ["--deltas", deltas, "--seeds", "0-1", "--out", out]
    assert _generate(*args, "--prompt", prompts[0], "--prompt", prompts[1]) == 0
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["generated"] == 4 and manifest["model"] == str(sd.name_or_path)
    assert [(im["seed"], Path(im["delta"]).name) for im in manifest["images"]] == [
        (0, "cat+dog.safetensors"),
        (1, "cat+dog.safetensors"),
        (0, "dog+hat.safetensors"),
        (1, "dog+hat.safetensors"),
    ]
    # the same images as applying that delta by hand, with the same seed
    from sepen.sampling import sample

    apply_delta(sd, cat_dog)
    by_hand = sample(sd, [prompts[0]], [1], 2, 6.0, 1)[0]
    from PIL import Image

    saved = np.asarray(Image.open(manifest["images"][1]["path"]), dtype=np.float32) / 255
    assert np.abs(saved - by_hand).max() <= 1 / 255 + 1e-6
    assert _generate(*args, "--prompt", prompts[0], "--prompt", prompts[1]) == 0
    assert json.loads((out / "generate.json").read_text())["generated"] == 0  # kept
    # a prompt no delta covers: one line naming it and the deltas there are
    code = _generate("--deltas", deltas, "--prompt", "a cat wearing a hat", "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and "no delta covers prompt 'a cat wearing a hat'" in err
    assert "cat+dog.safetensors: ['cat', 'dog']" in err and "sepen finetune --concepts" in err


def test_generate_uses_a_joint_delta_that_covers_the_prompt(tmp_path, sd):
    from sepen.cli.generate import choose_delta, delta_concepts, parse_seeds

    joint = _delta(tmp_path, sd, ["cat", "dog", "hat"], mode="joint")
    found = {joint: delta_concepts(joint)}
    assert choose_delta("a hat and a cat", found) == joint
    assert parse_seeds(["0-2", "7", "1"]) == [0, 1, 2, 7]
    with pytest.raises(SepenError, match="seed 'x' is not a number"):
        parse_seeds(["x"])


def test_generate_guides_each_image_at_test_time_without_a_delta(tmp_path, tiny_model, capsys):
    from sepen.config import load_config
    from sepen.models import load_pipeline
    from sepen.test_time import GuidanceMethod

    out, prompt = tmp_path / "images", "a photo of a cat and a dog"
    settings = ["--set", "evaluation.attend_excite.attention_res=8"]
    settings += ["--set", "evaluation.attend_excite.scale_factor=100000"]
    base = ["--model", tiny_model, "--prompt", prompt, "--seeds", "0-1", *settings]
    argv = [*base, "--test-time", "attend_excite", "--concepts", "cat", "dog", "--out", out]
    assert _generate(*argv) == 0
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["test_time"] == "attend_excite" and manifest["generated"] == 2
    # the images of the method's own sampling, with the same settings and seeds
    config = load_config(None, ["sampling.steps=2", *settings[1::2]])
    method = GuidanceMethod.from_config("attend_excite", config)
    pipe = load_pipeline(tiny_model)
    entry = {"prompt": prompt, "concepts": ["cat", "dog"]}
    by_hand = method.sample(pipe, [entry] * 2, method.positions(pipe, [entry]) * 2, [0, 1], 6.0)
    from PIL import Image

    for k in range(2):
        saved = np.asarray(Image.open(manifest["images"][k]["path"]), dtype=np.float32) / 255
        assert np.abs(saved - by_hand[k]).max() <= 1 / 255 + 1e-6
    plain = tmp_path / "plain"
    assert _generate(*base, "--out", plain) == 0
    plain_path = json.loads((plain / "generate.json").read_text())["images"][0]["path"]
    guided_image = np.asarray(Image.open(manifest["images"][0]["path"]), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(plain_path), dtype=np.int16) - guided_image).max() > 0
    # bad input: one line naming the value and the fix, before any image
    code = _generate(*base, "--test-time", "attend_excite", "--concepts", "cat", "--out", out)
    assert code == 2 and "needs --concepts naming two or more objects" in capsys.readouterr().err
    code = _generate(*base, "--test-time", "attend_excite", "--concepts", "cat", "horse",
                     "--out", tmp_path / "x")  # fmt: skip
    assert code == 2 and "'horse' not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- LoRA export


def _images(pipe, seed=0):
    from sepen.sampling import sample

    return sample(pipe, ["a photo of a cat and a dog"], [seed], 2, 6.0, 1)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny SD 1.x layout whose key projections have two widths, 32 x 48 and 64 x 48 (full
    ranks 32 and 48), as SD 1.4's 320/640/1280 x 768 layers have three (320, 640, 768)."""
    from sepen.models import save_tiny_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-wide"
    return save_tiny_pipeline(path, seed=0, cross_attention_dim=48)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_full_rank_lora_read_by_diffusers_draws_what_the_delta_draws(tmp_path, wide_model, fmt):
    """`--rank full` gives each layer its own full rank, so the file is exact where one rank
    for all layers cannot be; diffusers' own loader (`load_lora_weights`, which converts kohya
    files itself) draws with it what the delta draws."""
    from safetensors import safe_open

    from sepen.cli.export_lora import cli as export
    from sepen.lora import export_lora
    from sepen.models import load_pipeline

    pipe = load_pipeline(wide_model)
    delta = _delta(tmp_path, pipe, ["cat", "dog"])
    out = tmp_path / f"{fmt}.safetensors"
    assert export([str(delta), "--rank", "full", "--format", fmt, "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:  # the export's report, as the file's metadata holds it
        meta = f.metadata()
    assert meta["rank"] == "full" and sorted(set(json.loads(meta["ranks"]).values())) == [32, 48]
    assert json.loads(meta["relative_error"])["overall"] < 1e-6
    capped = export_lora(delta, tmp_path / "capped.safetensors", 32, fmt)  # one rank for all
    assert max(capped["relative_error"]["layers"].values()) > 0.05  # the 64-wide layer
    with_delta = load_pipeline(wide_model)
    apply_delta(with_delta, delta)
    with_lora = load_pipeline(wide_model)
    with_lora.load_lora_weights(str(out))  # a stock pipeline
    a, b = _images(with_delta), _images(with_lora)
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(a - _images(load_pipeline(wide_model))).max() > 1e-3  # the delta does act


def test_rank_for_reads_the_error_off_the_singular_values(tmp_path, sd, capsys):
    from sepen.cli.lora_rank import cli as rank_cli
    from sepen.lora import rank_for, ranks_needed

    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # error at rank r: sqrt(sum_{i>=r} s_i^2 / 14)
    assert [rank_for(s, e) for e in (0.0, 0.2, 0.3, 0.59, 0.6, 1.0)] == [3, 3, 2, 2, 1, 0]
    assert rank_for(torch.zeros(3), 0.01) == 0
    g = torch.Generator().manual_seed(0)
    change = sum(
        w * torch.randn(40, 1, generator=g) @ torch.randn(1, 30, generator=g) for w in (5, 1)
    )
    assert ranks_needed({"layer": change.double()}, [1e-5, 0.5]) == {"layer": {1e-5: 2, 0.5: 1}}
    delta = _delta(tmp_path, sd, ["cat", "dog"])
    assert rank_cli([str(delta), "--errors", "0.01", "0.5"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{delta}: 0.01: rank ") and line.endswith("; full ranks [32]")
    assert rank_cli([str(delta), "--errors", "5"]) == 2
    assert "--errors [5.0] must lie in [0, 1)" in capsys.readouterr().err


def test_lower_rank_errors_match_a_recomputation_and_kohya_names_round_trip(tmp_path, sd):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sepen.lora import export_lora

    delta = _delta(tmp_path, sd, ["cat", "dog"])
    report = export_lora(delta, tmp_path / "k.safetensors", 3, "kohya")
    base = dict(sd.unet.named_parameters())
    # a small reader of the kohya format written from its documented rules: keys
    # lora_unet_<module path with '_' for '.'>.{lora_down.weight, lora_up.weight, alpha},
    # weight change = up @ down * alpha / rank
    modules = {n.removesuffix(".weight").replace(".", "_"): n for n in base}
    changes = {}
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        stems = {
            k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys
        }
        for stem in stems:
            assert stem.startswith("lora_unet_")
            name = modules[stem.removeprefix("lora_unet_")]  # every name maps to a UNet weight
            down, up = (
                f.get_tensor(f"{stem}.lora_down.weight"),
                f.get_tensor(f"{stem}.lora_up.weight"),
            )
            alpha = float(f.get_tensor(f"{stem}.alpha"))
            assert down.shape[0] == up.shape[1] == 3 and alpha == 3.0
            changes[name] = (up.double() @ down.double()) * alpha / down.shape[0]
    tensors = load_file(str(delta))
    assert set(changes) == set(tensors)
    sq_err = sq_all = 0.0
    for name, approx in changes.items():
        exact = tensors[name].double() - base[name].detach().double()
        err = float((exact - approx).norm() / exact.norm())
        module = name.removesuffix(".weight")
        assert report["relative_error"]["layers"][module] == pytest.approx(err, rel=1e-6)
        sq_err += float((exact - approx).norm() ** 2)
        sq_all += float(exact.norm() ** 2)
    assert report["relative_error"]["overall"] == pytest.approx((sq_err / sq_all) ** 0.5, rel=1e-6)
    assert json.loads(meta["relative_error"]) == report["relative_error"]
    assert 0 < report["relative_error"]["overall"] < 1
    # diffusers' own loader reads the kohya file as the diffusers one: the same rank-3 change
    from sepen.models import load_pipeline

    export_lora(delta, tmp_path / "d.safetensors", 3, "diffusers")
    drawn = []
    for name in ("k", "d"):
        pipe = load_pipeline(sd.name_or_path)
        pipe.load_lora_weights(str(tmp_path / f"{name}.safetensors"))
        drawn.append(_images(pipe))
    assert np.abs(drawn[0] - drawn[1]).max() < 1e-4
    assert np.abs(drawn[0] - _images(load_pipeline(sd.name_or_path))).max() > 1e-3


def test_a_lora_delta_is_converted_directly(tmp_path, sd, tiny_model):
    from sepen.lora import export_lora
    from sepen.models import load_pipeline

    rank, g = 2, torch.Generator().manual_seed(3)
    tensors = {}
    for n, p in sd.unet.named_parameters():
        if n.endswith("attn2.to_k.weight"):
            layer = n.removesuffix(".weight")
            tensors[f"{layer}.lora_A"] = 0.1 * torch.randn(rank, p.shape[1], generator=g)
            tensors[f"{layer}.lora_B"] = 0.1 * torch.randn(p.shape[0], rank, generator=g)
    delta = save_delta(
        tmp_path / "lora-delta.safetensors",
        tensors,
        base_model=str(tiny_model),
        revision=None,
        trainable="lora",
        config={},
        lora_scale=1.0,
    )
    report = export_lora(delta, tmp_path / "l.safetensors", None, "diffusers")
    assert report["rank"] == rank and report["relative_error"]["overall"] < 1e-6
    a = load_pipeline(tiny_model)
    apply_delta(a, delta)
    b = load_pipeline(tiny_model)
    b.load_lora_weights(str(tmp_path / "l.safetensors"))
    assert np.abs(_images(a) - _images(b)).max() < 1e-4


def test_export_lora_bad_inputs_get_one_line(tmp_path, sd, capsys):
    from sepen.__main__ import main as sepen

    delta = _delta(tmp_path, sd, ["cat", "dog"])
    out = tmp_path / "l.safetensors"
    cases = [
        (["--rank", "4096"], "rank 4096 is outside 1.."),
        (["--rank", "4", "--model", "CompVis/stable-diffusion-v1-4"], "was trained on base model"),
        (["--rank", "4", "--format", "comfy"], "invalid choice: 'comfy'"),
        (["--rank", "many"], "'many' is not a rank: give a number (e.g. 16) or 'full'"),
    ]
    for extra, message in cases:
        try:
            code = sepen(["export-lora", str(delta), "--out", str(out), *extra])
        except SystemExit as exit_:  # argparse's own errors exit with status 2
            code = exit_.code
        assert code == 2 and message in capsys.readouterr().err
        assert not out.exists()
    assert (
        sepen(["export-lora", str(tmp_path / "none.safetensors"), "--rank", "2", "--out", str(out)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- every model a config needs


def test_every_missing_model_is_named_in_one_message(tmp_path, capsys, monkeypatch):
    from sepen.models.required import check_all, requirements

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    config = load_config(ROOT / "config/sd14_pairs.yaml")
    keys = [r.key for r in requirements(config)]
    assert keys == [
        "model.pretrained",
        "evaluation.clip",
        "evaluation.blip.model",
        "evaluation.detection.model",
    ]
    with pytest.raises(ModelNotAvailableError) as err:
        check_all(config)
    message = str(err.value)
    assert message.startswith("4 model(s) missing")
    for name in ("CompVis/stable-diffusion-v1-4", "ViT-B-16/openai", "blip", "owlv2"):
        assert name in message
    from sepen.__main__ import main as sepen

    assert sepen(["models", "--config", str(ROOT / "config/sd14_pairs.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("MISSING") for line in lines) == 4
    assert "sepen models --config" in lines[-1] and "--download" in lines[-1]


def test_a_present_model_is_listed_as_present(tiny_model, tmp_path, capsys):
    from sepen.__main__ import main as sepen

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_model)}}))
    assert sepen(["models", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith(f"present  model.pretrained = {tiny_model}")


# ---------------------------------------------------------------- the README's commands


def _readme_fix_block() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Fix my prompt", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    shell = next(code for lang, code in blocks if lang == "bash")
    python = next(code for lang, code in blocks if lang == "python")
    return shell, python


@pytest.mark.slow
def test_readme_fix_my_prompt_commands_run_on_the_tiny_model(tmp_path, tiny_model):
    shell, python = _readme_fix_block()
    # the block sets MODEL to Stable Diffusion; here it is the tiny model, offline
    shell = re.sub(r"(?m)^MODEL=.*$", f"MODEL={tiny_model}", shell)
    # the random tiny model's keys need a larger step than SD's for its images to change
    # visibly (at the paper's 2e-6 they move by one grey level at most), and it draws at 128
    # px (latents 16): SD's 512 would train it on latents 4x larger than it draws, 6x slower
    tiny = "--set finetune.learning_rate=1e-3 --set finetune.image_size=128"
    shell = re.sub(r"(?m)^(sepen finetune .*)$", rf"\1 {tiny}", shell)
    assert tiny in shell
    for folder in ("config", "data"):
        os.symlink(ROOT / folder, tmp_path / folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["bash", "-e", "-c", shell],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    python = python.replace("CompVis/stable-diffusion-v1-4", str(tiny_model))
    import torch

    if not torch.cuda.is_available():  # the snippet draws on a GPU; here on the CPU
        assert '.to("cuda")' in python
        python = python.replace('.to("cuda")', "")
    proc = subprocess.run(
        ["python", "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # step 2 drew the prompt with the fix: its images differ from the base model's on the same
    # seeds and settings; step 3's LoRA, loaded by diffusers, draws step 2's seed-0 image
    import numpy as np
    from PIL import Image

    from sepen.models import load_pipeline

    fixed = sorted((tmp_path / "fixes" / "images").rglob("seed-*.png"))
    assert [p.name for p in fixed] == [f"seed-{s:05d}.png" for s in range(4)]
    pipe = load_pipeline(tiny_model)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    base = pipe(
        ["a photo of a cat and a dog"] * 4,
        num_inference_steps=50,
        guidance_scale=6.0,
        generator=gens,
        output_type="np",
    ).images
    base = np.round(base * 255).astype(np.int16)
    drawn = np.stack([np.asarray(Image.open(p).convert("RGB"), np.int16) for p in fixed])
    assert np.abs(drawn - base).max() >= 8  # the fix changed the images
    lora = np.asarray(Image.open(tmp_path / "fixes" / "cat-dog.png").convert("RGB"), np.int16)
    assert np.abs(lora - drawn[0]).max() <= 2  # rank 16 holds this per-pair change
