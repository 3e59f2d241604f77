"""`sepen sample`: images of one method for one shard of the plan's prompts, resumable.

Image (prompt p, seed s) goes to `<images-dir>/<p>/seed-<s>.png`, written atomically; images
already there are kept, so an interrupted shard re-run generates only the missing ones. Images
are drawn in fixed batches (the shard's items in order, `sampling.batch_size` at a time), and a
re-run draws every batch that holds a missing image whole: each image comes from the same batch
as in an uninterrupted run, so the pixels are the same (a batch's size and neighbours change
the arithmetic of a device's kernels). The shard's manifest (JSON) lists every image, how many
were generated (written) in this run, how many were kept (`reused`) and how many were drawn.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sepen.atomic import write_bytes, write_json
from sepen.command import run_step, step_parser
from sepen.config import load_config
from sepen.errors import SepenError
from sepen.plan import read_plan, shard_prompts

log = logging.getLogger("sepen.sample")


def image_path(images_dir: Path, prompt_id: str, seed: int) -> Path:
    return Path(images_dir) / prompt_id / f"seed-{seed:05d}.png"


def is_complete(path: Path) -> bool:
    """A finished image: exists and decodes (a half-written file is regenerated)."""
    if not path.is_file():
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decoding failure means "not finished"
        return False


def save_png(array, path: Path) -> None:
    """Save a float image in [0, 1] (h, w, 3) as PNG atomically."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.clip(np.round(np.asarray(array) * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def device_and_dtype(sampling: dict, shard: int = 0) -> tuple[str, str]:
    """The device and precision of a job. With several GPUs visible (a workstation, where jobs
    are not given their own), shard k takes GPU k mod count, so shards run side by side."""
    device = sampling["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SepenError(
            "sampling.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'"
        )
    if device == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{shard % torch.cuda.device_count()}"
    dtype = sampling["dtype"]
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


class DeltaSwitcher:
    """Applies one finetuned delta at a time to a pipeline, restoring the base weights between."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.saved: dict[str, torch.Tensor] = {}
        self.current: str | None = None

    def _names(self, path: Path) -> set[str]:
        from sepen.delta import read_delta

        tensors, _ = read_delta(path)
        return {k.rsplit(".lora_", 1)[0] + ".weight" if ".lora_" in k else k for k in tensors}

    def use(self, path: Path | None) -> None:
        key = str(path) if path else None
        if key == self.current:
            return
        params = dict(self.pipe.unet.named_parameters())
        with torch.no_grad():
            for name, value in self.saved.items():
                params[name].copy_(value)
        if path is not None:
            from sepen.delta import apply_delta

            for name in self._names(path) - set(self.saved):
                if name in params:
                    self.saved[name] = params[name].detach().clone()
            apply_delta(self.pipe, path)
        self.current = key


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model: str, revision: str | None) -> object:
    """A hub id with its revision, or a local folder's file list with sizes and times."""
    folder = Path(model)
    if not folder.is_dir():
        return [model, revision]
    return sorted(
        (str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in folder.rglob("*")
        if f.is_file()
    )


def settings_fingerprint(config: dict, model: str, method: str, deltas) -> str:
    """What the images depend on besides prompt and seed; a change invalidates kept images."""
    import hashlib
    import json

    sp = config["sampling"]
    used = sorted({str(d) for d in deltas if d is not None})
    data = {
        "model": model_fingerprint(model, config["model"]["revision"]),
        "method": method,
        "sampling": [sp["steps"], sp["guidance_scale"], device_and_dtype(sp)[1]],
        "deltas": {d: file_digest(Path(d)) for d in used},
    }
    if method == "attend_excite":
        data["attend_excite"] = config["evaluation"]["attend_excite"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def invalidate_if_changed(images_dir: Path, fingerprint: str) -> bool:
    """Remove kept images made with other settings; returns whether any were removed.

    Under an exclusive lock on the folder, so that two processes sampling the same shard at
    once (a retried job beside a live one) do not remove each other's fresh images.
    """
    import fcntl
    import shutil

    images_dir.mkdir(parents=True, exist_ok=True)
    with open(images_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = images_dir / ".settings"
        if stamp.is_file() and stamp.read_text().strip() == fingerprint:
            return False
        removed = False
        for child in images_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
                removed = True
        write_bytes(stamp, fingerprint.encode())
        return removed


def attend_excite_pipeline(pipe):
    """diffusers' Attend-and-Excite pipeline sharing the base pipeline's components."""
    from sepen.models.loading import is_sdxl

    if is_sdxl(pipe):
        raise SepenError(
            "Attend-and-Excite has no Stable Diffusion XL pipeline in diffusers: remove "
            "attend_excite from evaluation.methods (SDXL configs compare base and SepEn)"
        )
    try:
        from diffusers import StableDiffusionAttendAndExcitePipeline
    except ImportError as err:  # removed from a future diffusers
        raise SepenError(
            "this diffusers has no StableDiffusionAttendAndExcitePipeline: install "
            "diffusers<=0.42 to sample the attend_excite baseline"
        ) from err
    ae = StableDiffusionAttendAndExcitePipeline.from_pipe(pipe)
    ae.set_progress_bar_config(disable=True)
    return ae


PUBLISHED_STEPS = 50  # Attend-and-Excite's schedule is given for 50 denoising steps
PUBLISHED_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
PUBLISHED_MAX_ITER = 25


def attend_excite_schedule(ae_cfg: dict, steps: int) -> tuple[int, dict[int, float]]:
    """(max_iter_to_alter, thresholds) for `steps` denoising steps.

    Unset values take the published schedule for 50 steps with its step indices scaled to
    `steps` (for 25 steps: updates in the first 12, refinement at steps 0, 5 and 10), so the
    updates cover the same part of the denoising trajectory.
    """
    scale = steps / PUBLISHED_STEPS
    max_iter = ae_cfg["max_iter_to_alter"]
    if max_iter is None:
        max_iter = int(PUBLISHED_MAX_ITER * scale)
    thresholds = ae_cfg["thresholds"]
    if thresholds is None:
        thresholds = {int(k * scale): v for k, v in PUBLISHED_THRESHOLDS.items()}
    else:
        thresholds = {int(k): float(v) for k, v in thresholds.items()}
    return max_iter, thresholds


def sample_attend_excite(ae, entry: dict, seeds, sp: dict, ae_cfg: dict):
    """Images of one prompt with Attend-and-Excite; its token indices from our token mapper.

    Every sub-token of every concept is a target (a multi-token concept is not reduced to its
    first token, the defect METHOD.md lists).
    """
    from sepen.tokens import concept_token_positions

    positions = concept_token_positions(ae.tokenizer, entry["prompt"], entry["concepts"])
    indices = sorted({i for sub in positions for i in sub})
    res = ae_cfg["attention_res"]
    max_iter, thresholds = attend_excite_schedule(ae_cfg, sp["steps"])
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return ae(
        [entry["prompt"]] * len(seeds),
        token_indices=[indices] * len(seeds),
        attn_res=(res, res),
        num_inference_steps=sp["steps"],
        guidance_scale=sp["guidance_scale"],
        max_iter_to_alter=max_iter,
        thresholds=thresholds,
        scale_factor=ae_cfg["scale_factor"],
        generator=gens,
        output_type="np",
    ).images


def group_by(items: list, key) -> dict:
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def plan_items(plan: dict, shard: int, shards: int, method: str, sets=()) -> list[tuple[str, int]]:
    ids = shard_prompts(plan, shard, shards, method, sets)
    return [(pid, s) for pid in ids for s in plan["seeds"]]


def delta_for(plan: dict, method: str, prompt_id: str, model_dir: Path | None) -> Path | None:
    model = plan["prompts"][prompt_id]["model"]
    if method != "sepen" or model is None:
        return None
    return Path(model_dir) / f"{model}.safetensors"


def draw_and_save(
    groups: dict, draw, path_of, batch_size: int, desc: str, switcher=None, missing=None
) -> int:
    """Draw the items of `groups` ({key: [item]}) in batches and save each image; returns how
    many images were drawn.

    The batches are fixed: each group's items in order, `batch_size` at a time, whatever is
    already on disk. An image's batch (its neighbours and the batch size), and so its exact
    pixels on any device, is the same in a resumed run as in an uninterrupted one. With
    `missing` (a set of items), only the batches holding a missing item are drawn, whole, and
    only the missing images are saved; finished images are never rewritten.

    With a `switcher` (DeltaSwitcher), each group's key is the delta its items are drawn with;
    `draw(chunk)` gives the chunk's images, `path_of(item)` an image's path.
    """
    chunks = [
        (key, group[lo : lo + batch_size])
        for key, group in groups.items()
        for lo in range(0, len(group), batch_size)
    ]
    if missing is not None:
        chunks = [(key, chunk) for key, chunk in chunks if any(i in missing for i in chunk)]
    drawn = sum(len(chunk) for _, chunk in chunks)
    bar = tqdm(total=drawn, desc=desc, mininterval=10)
    for key, chunk in chunks:
        if switcher is not None:
            switcher.use(key)
        for item, image in zip(chunk, draw(chunk)):
            if missing is None or item in missing:
                save_png(image, path_of(item))
        bar.update(len(chunk))
    bar.close()
    return drawn


def prompts_by_delta(plan: dict, method: str, ids, model_dir: Path | None) -> dict:
    """{delta (None: the base model): the prompt ids drawn with it}, in the order of `ids`."""
    return group_by(list(ids), lambda pid: delta_for(plan, method, pid, model_dir))


def run(args: argparse.Namespace) -> dict:
    config = load_config(args.config, args.set)
    plan = read_plan(args.plan)
    if args.method not in config["evaluation"]["methods"]:
        raise SepenError(
            f"method {args.method!r} is not in evaluation.methods {config['evaluation']['methods']}"
        )
    if args.method == "sepen" and args.model_dir is None:
        raise SepenError("method 'sepen' needs --model-dir, the folder of the finetuned deltas")
    items = plan_items(
        plan, args.shard, args.shards, args.method, config["evaluation"]["attend_excite"]["sets"]
    )
    deltas = {pid: delta_for(plan, args.method, pid, args.model_dir) for pid, _ in items}
    missing = sorted({str(d) for d in deltas.values() if d is not None and not d.is_file()})
    if missing:
        raise SepenError(f"finetuned deltas missing: {missing[:3]}: run `sepen finetune` for them")
    images_dir = Path(args.images_dir)
    model = args.model or config["model"]["pretrained"]
    from sepen.delta import check_base_model

    for delta in sorted({str(d) for d in deltas.values() if d is not None}):
        check_base_model(delta, model)
    fingerprint = settings_fingerprint(config, model, args.method, deltas.values())
    if invalidate_if_changed(images_dir, fingerprint):
        log.warning("settings changed since the kept images were made: sampling them again")
    todo = [(pid, s) for pid, s in items if not is_complete(image_path(images_dir, pid, s))]
    log.info(
        "%s shard %d/%d: %d images, %d already there, %d to generate",
        args.method,
        args.shard,
        args.shards,
        len(items),
        len(items) - len(todo),
        len(todo),
    )
    drawn = 0
    if todo:
        from sepen.models import load_pipeline
        from sepen.sampling import sample

        device, dtype = device_and_dtype(config["sampling"], args.shard)
        pipe = load_pipeline(model, config["model"]["revision"], dtype=dtype, device=device)
        switcher = None
        sp = config["sampling"]
        if args.method == "attend_excite":  # one prompt per call: its token indices
            ae = attend_excite_pipeline(pipe)
            ae_cfg = config["evaluation"]["attend_excite"]
            groups = group_by(items, lambda item: item[0])

            def draw(chunk):
                entry = plan["prompts"][chunk[0][0]]
                return sample_attend_excite(ae, entry, [s for _, s in chunk], sp, ae_cfg)

        else:  # one delta at a time (per-pair models), prompts batched across
            switcher = DeltaSwitcher(pipe)
            groups = group_by(items, lambda item: deltas[item[0]])

            def draw(chunk):
                prompts = [plan["prompts"][pid]["prompt"] for pid, _ in chunk]
                seeds = [s for _, s in chunk]
                return sample(pipe, prompts, seeds, sp["steps"], sp["guidance_scale"], len(chunk))

        drawn = draw_and_save(
            groups,
            draw,
            lambda item: image_path(images_dir, *item),
            sp["batch_size"],
            f"sampling {args.method}",
            switcher,
            missing=set(todo),
        )
    manifest = {
        "method": args.method,
        "shard": args.shard,
        "shards": args.shards,
        "images_dir": str(images_dir),
        "generated": len(todo),
        "reused": len(items) - len(todo),
        "drawn": drawn,
        "images": [
            {"prompt_id": pid, "seed": s, "path": str(image_path(images_dir, pid, s))}
            for pid, s in items
        ],
    }
    write_json(args.out, manifest)
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = step_parser("sepen sample", __doc__.split("\n")[0])
    p.add_argument("--plan", type=Path, required=True, help="prompts.json of `sepen prompts`")
    p.add_argument("--method", required=True, help="one of evaluation.methods")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--model", help="base model folder or hub id (default: model.pretrained)")
    p.add_argument("--model-dir", type=Path, help="folder of <model id>.safetensors deltas")
    p.add_argument("--images-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the shard's manifest (JSON)")
    return p.parse_args(argv)


def cli(argv=None) -> int:
    args = parse_args(argv)
    return run_step("sepen sample", lambda: run(args))
