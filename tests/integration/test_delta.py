import json

import pytest
import torch
from safetensors.torch import save_file

from sepen.attention import install_capture
from sepen.delta import apply_delta, read_delta, save_delta, unet_delta_tensors
from sepen.errors import DeltaError
from sepen.losses import total_loss
from sepen.models import build_tiny_pipeline, load_pipeline
from sepen.trainable import prepare_trainable, trainable_layers


def _train_a_little(pipe, mode):
    unet = pipe.unet
    store = install_capture(unet, [8])
    params = prepare_trainable(unet, trainable_layers(unet, store.captured, True), mode, 2)
    opt = torch.optim.AdamW(params.values(), lr=5e-2)
    g = torch.Generator().manual_seed(0)
    emb = pipe.text_encoder(
        pipe.tokenizer(["a cat and a dog"] * 2, padding="max_length", return_tensors="pt").input_ids
    )[0].detach()
    for _ in range(3):
        store.reset()
        unet(torch.randn(2, 4, 16, 16, generator=g), torch.tensor([300, 700]), emb)
        maps = store.aggregate()[..., [2, 5]].permute(0, 4, 1, 2, 3)
        total_loss(maps)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return params


def _images(pipe):
    out = pipe(
        "a cat and a dog",
        num_inference_steps=3,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize("mode", ["to_k", "lora"])
def test_delta_applied_to_a_fresh_pipeline_gives_the_trained_images(tiny_model, tmp_path, mode):
    trained = load_pipeline(tiny_model)
    base_images = _images(trained)
    params = _train_a_little(trained, mode)
    with torch.no_grad():
        trained_images = _images(trained)
    assert (trained_images - base_images).abs().max() > 1e-3  # training changed something
    path = save_delta(
        tmp_path / "d.safetensors",
        unet_delta_tensors(trained.unet, mode),
        base_model=str(tiny_model),
        revision=None,
        trainable=mode,
        config={"finetune": {"trainable": mode}},
        lora_scale=1.0 if mode == "lora" else None,
    )
    tensors, meta = read_delta(path)
    assert meta["base_model"] == str(tiny_model) and meta["trainable"] == mode
    assert json.loads(meta["parameters"]) == {k: list(v.shape) for k, v in tensors.items()}
    assert len(tensors) == len(params)
    fresh = load_pipeline(tiny_model)
    apply_delta(fresh, path)
    assert (_images(fresh) - trained_images).abs().max().item() <= 1e-5


def test_delta_for_another_base_model_is_rejected_and_changes_nothing(tiny_model, tmp_path):
    other = build_tiny_pipeline(seed=1, cross_attention_dim=16)
    params = prepare_trainable(other.unet, trainable_layers(other.unet, [], True), "to_k")
    assert params
    path = save_delta(
        tmp_path / "other.safetensors",
        unet_delta_tensors(other.unet, "to_k"),
        base_model="tiny-16",
        revision=None,
        trainable="to_k",
        config={},
    )
    pipe = load_pipeline(tiny_model)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    with pytest.raises(
        DeltaError,
        match=r"has shape \(32, 32\), the delta's has \(32, 16\).*"
        r"base model 'tiny-16'",
    ):
        apply_delta(pipe, path)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    save_delta(
        tmp_path / "names.safetensors",
        {"no.such.layer.weight": torch.zeros(2, 2)},
        base_model="elsewhere",
        revision=None,
        trainable="to_k",
        config={},
    )
    with pytest.raises(DeltaError, match="no.such.layer.weight does not exist in this UNet"):
        apply_delta(pipe, tmp_path / "names.safetensors")


def test_corrupt_or_foreign_delta_is_a_clear_error(tiny_model, tmp_path):
    good = save_delta(
        tmp_path / "d.safetensors",
        {"a": torch.ones(3)},
        base_model="m",
        revision=None,
        trainable="to_k",
        config={},
    )
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaError, match="cut.safetensors' is corrupt or not a safetensors"):
        read_delta(tmp_path / "cut.safetensors")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04\x95 not a safetensors file")
    with pytest.raises(DeltaError, match="corrupt or not a safetensors"):
        read_delta(tmp_path / "pickle.pt")
    save_file({"a": torch.ones(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DeltaError, match="not a sepen delta"):
        read_delta(tmp_path / "plain.safetensors")
    with pytest.raises(DeltaError, match="does not exist: run `sepen finetune` first"):
        read_delta(tmp_path / "missing.safetensors")


def test_save_delta_is_atomic(tmp_path, monkeypatch):
    target = save_delta(
        tmp_path / "d.safetensors",
        {"a": torch.ones(3)},
        base_model="m",
        revision=None,
        trainable="to_k",
        config={},
    )
    original = target.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sepen.delta.safetensors_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        save_delta(
            target,
            {"a": torch.zeros(3)},
            base_model="m",
            revision=None,
            trainable="to_k",
            config={},
        )
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_the_same_delta_written_by_two_processes_is_the_same_file(tmp_path):
    """safetensors orders its header as a hash map does, differently in every process; sepen's
    writer sorts it, so that a re-run's delta has the same hash (the kill tests compare them)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from sepen.delta import save_delta\n"
        "t = {f'l{i}.to_k.weight': torch.full((2, 3), float(i)) for i in range(12)}\n"
        "save_delta(sys.argv[1], t, base_model='m', revision=None, trainable='to_k',"
        " config={'a': 1})\n"
    )
    files = [tmp_path / f"d{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    tensors, meta = read_delta(files[0])
    assert tensors["l5.to_k.weight"].eq(5.0).all() and meta["base_model"] == "m"
