"""The resumable image store of a sampling shard.

Image (prompt p, seed s) goes to `<images-dir>/<p>/seed-<s>.png`, written atomically; images
already there are kept, so an interrupted shard re-run generates only the missing ones. Images
are drawn in fixed batches (the shard's items in order, `sampling.batch_size` at a time), and a
re-run draws every batch that holds a missing image whole: each image comes from the same batch
as in an uninterrupted run, so the pixels are the same (a batch's size and neighbours change
the arithmetic of a device's kernels). A settings stamp in the folder says what the kept images
were made with; images of other settings are drawn again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from sepen.atomic import write_bytes
from sepen.pipelines import device_and_dtype
from sepen.plan import TEST_TIME_FINETUNE_KEYS


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


def file_digest(path: Path) -> str:
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
    sp = config["sampling"]
    used = sorted({str(d) for d in deltas if d is not None})
    data = {
        "model": model_fingerprint(model, config["model"]["revision"]),
        "method": method,
        "sampling": [sp["steps"], sp["guidance_scale"], device_and_dtype(sp)[1]],
        "deltas": {d: file_digest(Path(d)) for d in used},
    }
    if method in ("attend_excite", "sepen_test_time"):  # the test-time methods' settings
        data[method] = config["evaluation"][method]
        if method == "sepen_test_time":
            data["losses"] = {k: config["finetune"][k] for k in TEST_TIME_FINETUNE_KEYS}
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
