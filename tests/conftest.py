import os
import tempfile

# Tests never read this machine's model caches: a fresh, empty Hugging Face home (and torch hub
# folder) for the whole run, set before anything imports huggingface_hub (which reads HF_HOME
# once, at import), and inherited by every subprocess a test starts.
ISOLATED_HOME = tempfile.mkdtemp(prefix="sepen-tests-home-")
os.environ["HF_HOME"] = os.path.join(ISOLATED_HOME, "huggingface")
os.environ["TORCH_HOME"] = os.path.join(ISOLATED_HOME, "torch")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)

import pytest  # noqa: E402
import torch  # noqa: E402

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


# A toy-world model small enough to pretrain in seconds (sepen.toy).
TINY_TOY = {
    "toy": {
        "model": {"channels": [8, 16, 16], "text_width": 16, "vae_channels": 8},
        "pretrain": {
            "vae_steps": 2,
            "steps": 3,
            "batch_size": 4,
            "validation_images": 0,
            "warmup_steps": 1,
        },
    }
}


@pytest.fixture(scope="session")
def tiny_toy_model(tmp_path_factory):
    """A pretrained tiny toy-world pipeline folder (deterministic, seed 0)."""
    from sepen.config import validate_config
    from sepen.toy.pretrain import pretrain

    path = tmp_path_factory.mktemp("toy") / "base"
    pretrain(validate_config(TINY_TOY), path, progress=False)
    return path


def write_toy_config(path, model, **finetune):
    """A config file for the tiny toy model: 2 sampling steps, 2 joint finetuning steps."""
    import yaml

    ft = {"mode": "joint", "image_size": 32, "steps": 2, "batch_size": 2, **finetune}
    config = {
        **TINY_TOY,
        "model": {"pretrained": str(model)},
        "sampling": {"steps": 2, "guidance_scale": 2.0},
        "finetune": ft,
    }
    path.write_text(yaml.safe_dump(config))
    return path
