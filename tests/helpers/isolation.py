"""Tests never read this machine's model caches: a fresh, empty Hugging Face home (and torch
hub folder) for the whole run, set on import (conftest imports this first, before anything
imports huggingface_hub, which reads HF_HOME once) and inherited by every subprocess."""

import os
import tempfile

ISOLATED_HOME = tempfile.mkdtemp(prefix="sepen-tests-home-")
os.environ["HF_HOME"] = os.path.join(ISOLATED_HOME, "huggingface")
os.environ["TORCH_HOME"] = os.path.join(ISOLATED_HOME, "torch")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
