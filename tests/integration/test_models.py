import pytest

from sepen.errors import ModelNotAvailableError
from sepen.models import load_pipeline


def test_tiny_pipeline_round_trips_with_the_real_tokenizer(tiny_model, tiny_pipe):
    assert (tiny_model / "model_index.json").is_file()
    assert tiny_pipe.tokenizer.model_max_length == 77
    assert tiny_pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    assert tiny_pipe.unet.config.cross_attention_dim == tiny_pipe.text_encoder.config.hidden_size
    assert tiny_pipe.vae.config.block_out_channels == [8, 8, 16, 16]  # VAE factor 8, as SD


def test_missing_hub_model_offline_names_the_model_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        load_pipeline("CompVis/stable-diffusion-v1-4")
    message = str(err.value)
    assert "'CompVis/stable-diffusion-v1-4'" in message
    assert "huggingface-cli download CompVis/stable-diffusion-v1-4" in message
    assert "save_pretrained" in message


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="does not exist: check the path"):
        load_pipeline(str(tmp_path / "nowhere" / "sd"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="has no model_index.json"):
        load_pipeline(tmp_path / "empty")


def test_tests_read_an_isolated_model_cache_not_the_machines():
    """conftest points the Hugging Face cache at an empty temporary home: a model in it is
    found, and nothing under the machine's own cache is (the real SD weights, if present there,
    cannot make a missing-model test pass or fail)."""
    import os
    from pathlib import Path

    import huggingface_hub.constants as hub
    from helpers.isolation import ISOLATED_HOME
    from huggingface_hub import snapshot_download

    assert Path(hub.HF_HUB_CACHE).is_relative_to(ISOLATED_HOME)
    assert Path(os.environ["HF_HOME"]).is_relative_to(ISOLATED_HOME)
    assert not Path(hub.HF_HUB_CACHE).is_relative_to(Path.home() / ".cache")
    # a snapshot written in the hub's cache layout there is what the loader finds offline
    repo = Path(hub.HF_HUB_CACHE) / "models--someone--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    assert Path(snapshot_download("someone/cached", local_files_only=True)) == snap


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_a_built_tiny_pipeline_is_as_from_pretrained_deterministic(kind):
    """A model built from its config is in training mode; the tiny T5's dropout then made each
    prompt encoding differ (SD3's loop vs its own pipeline: latents 6e-3 apart at guidance 1)."""
    import torch

    from sepen.denoising import encode
    from sepen.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
    from sepen.models.tiny_mmdit import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    build = {
        "sd": build_tiny_pipeline,
        "sdxl": build_tiny_sdxl_pipeline,
        "sd3": build_tiny_sd3_pipeline,
        "flux": build_tiny_flux_pipeline,
    }[kind]
    pipe = build()
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert modules and not any(m.training for m in modules)
    prompts = ["a cat and a dog", "a photo of a horse and a hat"]
    first, second = (encode(pipe, prompts, 1.0, 128, 128) for _ in range(2))
    assert torch.equal(first.emb, second.emb)
