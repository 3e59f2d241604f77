"""Every model a config needs (base model, CLIP, BLIP, detector, FID weights), whether each is
here, and fetching the missing ones on a connected machine (`sepen models`).

The first workflow job (`sepen prompts`) calls `check_all`, so an offline run names every
missing model in one message instead of stopping on the first one and on the next one after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sepen.errors import ModelNotAvailableError
from sepen.evaluators.clip import check_available


@dataclass(frozen=True)
class Requirement:
    key: str  # the config key that names it
    model: str  # hub id, local path, open_clip name/tag or torchvision weights name
    kind: str  # pipeline | hub | open_clip | inception
    revision: str | None = None

    def label(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.key} = {self.model}{rev} ({self.kind})"


# What the base models of the paper's and the MMDiT configs are, and what fetching them needs
ABOUT = {
    "CompVis/stable-diffusion-v1-4": "SD 1.4: UNet, CLIP ViT-L/14 (about 4 GB in float32)",
    "stabilityai/stable-diffusion-2-1": "SD 2.1: UNet, OpenCLIP ViT-H/14, 768 px",
    "stabilityai/stable-diffusion-xl-base-1.0": "SDXL base: UNet, two CLIP encoders, 1024 px",
    "stabilityai/stable-diffusion-3.5-medium": (
        "SD3.5 Medium: MMDiT (24 joint blocks), two CLIP encoders and T5-XXL; gated - accept "
        "its licence on the hub and log in (`huggingface-cli login`) before --download"
    ),
    "stabilityai/stable-diffusion-3.5-large": (
        "SD3.5 Large: MMDiT (38 joint blocks), two CLIP encoders and T5-XXL; gated - accept "
        "its licence on the hub and log in before --download"
    ),
    "black-forest-labs/FLUX.1-dev": (
        "FLUX.1 [dev]: MMDiT (19 double-stream + 38 single-stream blocks), CLIP and T5-XXL, "
        "about 34 GB; gated - accept its licence on the hub and log in before --download"
    ),
}


def about(req: Requirement) -> str | None:
    """A line on what a known base model is and what fetching it needs (None if unknown)."""
    return ABOUT.get(req.model) if req.kind == "pipeline" else None


def requirements(config: dict) -> list[Requirement]:
    """The models `config` needs, in the order the workflow first loads them."""
    ev = config["evaluation"]
    out = []
    toy_made_here = ev["prompts"] == "toy" and config["toy"]["pretrain"]["run"]
    if not toy_made_here:  # a toy model pretrained in the DAG is made, not needed
        m = config["model"]
        out.append(Requirement("model.pretrained", m["pretrained"], "pipeline", m["revision"]))
    names = ev["metrics"]
    if "clip" in names or "blip" in names:
        clip = f"{ev['clip']['model']}/{ev['clip']['pretrained']}"
        out.append(Requirement("evaluation.clip", clip, "open_clip"))
    if "blip" in names:
        out.append(Requirement("evaluation.blip.model", ev["blip"]["model"], "hub"))
    if "detection" in names:
        out.append(Requirement("evaluation.detection.model", ev["detection"]["model"], "hub"))
    fid = ev["fid"]
    if fid["reference"] and fid["weights"] and not Path(fid["weights"]).is_file():
        out.append(Requirement("evaluation.fid.weights", fid["weights"], "inception"))
    return out


def _inception_file(weights: str) -> Path:
    import torch
    from torchvision.models import Inception_V3_Weights

    spec = getattr(Inception_V3_Weights, weights, None)
    if spec is None:
        raise ModelNotAvailableError(
            f"evaluation.fid.weights {weights!r} is not a torchvision Inception_V3_Weights name "
            f"(e.g. IMAGENET1K_V1) or a local state-dict file"
        )
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name


def _in_hub_cache(model: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any lookup failure means "not here"
        return False
    return True


def problem(req: Requirement) -> str | None:
    """None when the model can be loaded offline; else how to provide it."""
    if req.kind in ("pipeline", "hub"):
        local = Path(req.model).expanduser()
        if local.exists():
            if req.kind == "pipeline" and not (local / "model_index.json").is_file():
                return "the folder has no model_index.json (write it with save_pretrained)"
            return None
        if _in_hub_cache(req.model, req.revision):
            return None
        return (
            f"not in the Hugging Face cache ({_hf_home()}): `sepen models --download` or "
            f"`huggingface-cli download {req.model}` where there is internet, then copy the "
            f"cache here; or give a local folder written by save_pretrained"
        )
    if req.kind == "open_clip":
        name, _, tag = req.model.rpartition("/")
        try:
            check_available(name, None if tag in ("", "None") else tag)
        except ModelNotAvailableError as err:
            return f"{err} (or `sepen models --download` where there is internet)"
        return None
    path = _inception_file(req.model)
    if path.is_file():
        return None
    return (
        f"{path.name} is not in {path.parent}: `sepen models --download` where there is "
        f"internet, or copy the file there, or set evaluation.fid.weights to a state-dict file"
    )


def _hf_home() -> str:
    import os

    return os.environ.get("HF_HOME", "~/.cache/huggingface")


def fetch(req: Requirement) -> None:
    """Download one model into the Hugging Face (or torch hub) cache."""
    if req.kind in ("pipeline", "hub"):
        from huggingface_hub import snapshot_download

        snapshot_download(req.model, revision=req.revision)
    elif req.kind == "open_clip":
        import open_clip

        name, _, tag = req.model.rpartition("/")
        open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
    else:
        import torch
        from torchvision.models import Inception_V3_Weights

        spec = getattr(Inception_V3_Weights, req.model)
        torch.hub.load_state_dict_from_url(spec.url, progress=True)


def check_all(config: dict) -> None:
    """One ModelNotAvailableError naming every missing model and how to provide it."""
    missing = [(r, p) for r in requirements(config) if (p := problem(r)) is not None]
    if missing:
        listed = "; ".join(f"{r.label()}: {p}" for r, p in missing)
        raise ModelNotAvailableError(f"{len(missing)} model(s) missing: {listed}")
