"""The benchmark scripts run (at tiny size, on CPU) and report ratios they measured."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_cost_times_stock_sepen_and_attend_excite(tmp_path, capsys):
    bench = _load("sampling_cost")
    out = tmp_path / "r.json"
    r = bench.main(
        ["--arch", "tiny", "--steps", "4", "--repeats", "1", "--device", "cpu", "--json", str(out)]
    )
    assert all(r[k] > 0 for k in ("stock_s", "sepen_s", "attend_excite_s"))
    assert r["sepen_vs_stock"] == r["sepen_s"] / r["stock_s"]
    printed = capsys.readouterr().out
    assert "Attend-Excite" in printed and f"{r['attend_excite_vs_stock']:.2f}" in printed
    assert out.read_text().count("stock_s") == 1


@pytest.mark.slow
def test_sd14_architecture_has_the_real_layer_shapes():
    bench = _load("sampling_cost")
    pipe = bench.sd14_pipeline()
    n = sum(p.numel() for p in pipe.unet.parameters())
    assert 855e6 < n < 865e6  # SD 1.x UNet: 859.5M parameters
    keys = [p for name, p in pipe.unet.named_parameters() if name.endswith("attn2.to_k.weight")]
    assert len(keys) == 16 and {tuple(k.shape)[1] for k in keys} == {768}
