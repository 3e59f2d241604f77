"""Fixtures of the whole suite: isolated model caches, tiny models, a fresh accelerate state."""

import os

from helpers.isolation import ISOLATED_HOME  # noqa: F401  # isort: skip  (first: the caches)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.toy import TINY_TOY, toy_experiment  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _isolated_model_caches():
    """Point huggingface_hub's constants at the isolated home even if a plugin imported it
    before this file ran (it reads HF_HOME only at import)."""
    import huggingface_hub.constants as hub

    home = os.environ["HF_HOME"]
    saved = (hub.HF_HOME, hub.HF_HUB_CACHE)
    hub.HF_HOME, hub.HF_HUB_CACHE = home, os.path.join(home, "hub")
    yield
    hub.HF_HOME, hub.HF_HUB_CACHE = saved


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def fresh_accelerator_state():
    """accelerate keeps one state per process; each in-process run starts from a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def clip_tokenizer():
    from sepen.models import build_clip_tokenizer

    return build_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SD pipeline saved with save_pretrained (latent 16; maps 16, 8, 4)."""
    from sepen.models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture()
def tiny_pipe(tiny_model):
    from sepen.models import load_pipeline

    return load_pipeline(tiny_model)


@pytest.fixture(scope="session")
def tiny_toy_model(tmp_path_factory):
    """A pretrained tiny toy-world pipeline folder (deterministic, seed 0)."""
    from sepen.config import validate_config
    from sepen.toy.pretrain import pretrain

    path = tmp_path_factory.mktemp("toy") / "base"
    pretrain(validate_config(TINY_TOY), path, progress=False)
    return path


@pytest.fixture()
def toy_setup(tmp_path, tiny_toy_model):
    """Config file, plan file and folders for a 2-prompt x 2-seed toy experiment."""
    return toy_experiment(tmp_path, tiny_toy_model)


@pytest.fixture(scope="session")
def tiny_mmdit_models(tmp_path_factory):
    """Tiny random SD3, SD3.5-style and FLUX.1 pipelines saved with save_pretrained, by kind."""
    from sepen.models.tiny_mmdit import save_tiny_mmdit_pipeline

    root = tmp_path_factory.mktemp("mmdit")
    return {kind: save_tiny_mmdit_pipeline(root / kind, kind) for kind in ("sd3", "sd35", "flux")}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip model config (random weights) registered from a JSON file."""
    import json

    path = tmp_path_factory.mktemp("clip") / "sepen-tiny-clip.json"
    path.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 16,
                },
                "text_cfg": {
                    "context_length": 77,
                    "vocab_size": 49408,
                    "width": 32,
                    "heads": 2,
                    "layers": 1,
                },
            }
        )
    )
    return str(path)
