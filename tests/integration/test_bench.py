"""The benchmark scripts run (at tiny size, on CPU) and report ratios they measured."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_script_runs_at_tiny_size_on_cpu_and_reports_measured_ratios(tmp_path):
    env = {**os.environ, "SEPEN_BENCH_OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpu-tiny-finetune-sdxl.json",
        "cpu-tiny-finetune.json",
        "cpu-tiny-mmdit-0.json",
        "cpu-tiny-mmdit-1.json",
        "cpu-tiny-sampling.json",
        "cpu-tiny.txt",
    ]
    for k, (arch, mode) in enumerate([("tiny-sd35", "pairs"), ("tiny-flux", "joint")]):
        row = json.loads((tmp_path / f"cpu-tiny-mmdit-{k}.json").read_text())
        assert (row["arch"], row["mode"], row["batch"]) == (arch, mode, 2)
        assert row["step_seconds_median"] > 0 and row["peak_memory_gib"] is None
        assert 0 < row["trainable_weights"] < row["total_weights"]
        assert (row["loss"].get("norm", 0) > 0) == (mode == "joint")
    xl = json.loads((tmp_path / "cpu-tiny-finetune-sdxl.json").read_text())
    xl_rows = {(r["mode"], r["variant"]): r for r in xl["rows"]}
    assert xl["size"] == "sdxl-tiny" and set(xl_rows) == set(
        (m, v) for m in ("pairs", "joint") for v in ("reference", "ours")
    )
    for mode in ("pairs", "joint"):  # the losses agree with the reference's before any time
        assert xl_rows[mode, "ours"]["loss_gap"] <= 1e-5
    step = json.loads((tmp_path / "cpu-tiny-finetune.json").read_text())
    rows = {(r["mode"], r["variant"]): r for r in step["rows"]}
    assert set(rows) == {(m, v) for m in ("pairs", "joint") for v in ("reference", "ours")}
    for mode in ("pairs", "joint"):
        ref, ours = rows[mode, "reference"], rows[mode, "ours"]
        assert ref["loss_gap"] == 0 and ours["loss_gap"] <= 1e-5
        assert ours["speedup"] == pytest.approx(ref["step_s"] / ours["step_s"])
        assert 0 < ours["peak_mb"] < 0.8 * ref["peak_mb"]  # no frozen copy, no stored maps
        assert ours["flops"] < ref["flops"]  # the early exit skips the last up block
        assert ours["tflops"] == pytest.approx(ours["flops"] / ours["step_s"] / 1e12)
    assert step["matmul_tflops"] > 0
    sampling = json.loads((tmp_path / "cpu-tiny-sampling.json").read_text())
    assert all(sampling[f"{k}_s"] > 0 for k in ("stock", "sepen", "attend_excite"))
    assert sampling["sepen_speed_vs_stock"] == pytest.approx(
        sampling["stock_s"] / sampling["sepen_s"]
    )
    text = (tmp_path / "cpu-tiny.txt").read_text()
    assert text.startswith("# cpu-tiny") and "finetuning step: tiny UNet" in text
    assert f"{sampling['attend_excite_images_per_s']:.3f}" in text


def test_the_loss_check_compares_every_step_and_part():
    bench = _load("finetune_step")
    a = [
        {"loss": 1.0, "separate": 0.5, "enhance": 1.0},
        {"loss": 0.9, "separate": 0.4, "enhance": 1.0},
    ]
    b = [dict(a[0]), {**a[1], "enhance": 1.0 + 3e-5}]
    assert bench.max_loss_gap(a, a) == 0
    assert bench.max_loss_gap(a, b) == pytest.approx(3e-5)
    with pytest.raises(ValueError):  # a variant that ran fewer steps is not compared silently
        bench.max_loss_gap(a, a[:1])


@pytest.mark.slow
def test_sdxl_architecture_has_the_real_layer_shapes():
    from diffusers import UNet2DConditionModel

    from sepen.attention import available_resolutions
    from sepen.models.tiny import sdxl_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config(1.0, 128))
    n = sum(p.numel() for p in unet.parameters())
    assert 2.56e9 < n < 2.57e9  # SDXL base UNet: 2.567B parameters
    levels = available_resolutions(unet, 128)
    # 64x64: 2 + 2 down, 3 x 2 up; 32x32: 2 x 10 down, 10 mid, 3 x 10 up transformer blocks
    assert {side: len(layers) for side, layers in levels.items()} == {64: 10, 32: 60}


@pytest.mark.slow
def test_sd14_architecture_has_the_real_layer_shapes():
    bench = _load("sampling_cost")
    pipe = bench.sd14_pipeline()
    n = sum(p.numel() for p in pipe.unet.parameters())
    assert 855e6 < n < 865e6  # SD 1.x UNet: 859.5M parameters
    keys = [p for name, p in pipe.unet.named_parameters() if name.endswith("attn2.to_k.weight")]
    assert len(keys) == 16 and {tuple(k.shape)[1] for k in keys} == {768}
