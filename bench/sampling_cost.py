"""Sampling cost: stock pipeline vs a SepEn delta vs the test-time methods (A&E, SepEn at test
time; sepen.guidance) and diffusers' own A&E pipeline where this diffusers has it.

Random weights, so no download: `--arch sd14` builds the Stable Diffusion 1.4 architecture
(UNet, CLIP ViT-L/14 text encoder, VAE) at 512 px; `--arch tiny` the tiny test model. Each
method samples the same prompt and seed; the methods run in turns, `--repeats` times after one
warm-up each, and the median is reported with its ratio to the stock pipeline. The paper's
peers report A&E at about 3.4x the time of plain sampling. Prints a table;
`--json` writes it.

    python bench/sampling_cost.py --arch sd14 --device cuda --dtype float16     # a GPU
    python bench/sampling_cost.py --arch tiny --steps 4 --repeats 1             # CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sd14_pipeline(seed: int = 0):
    """Stable Diffusion 1.4's architecture (diffusers' defaults are SD 1.x) with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sepen.models import build_clip_tokenizer
    from sepen.models.tiny import SD_SCHEDULER, assemble_pipeline, sd_unet_config

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd_unet_config(1.0, sample_size=64))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        **SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return assemble_pipeline(vae, text, tokenizer, unet, scheduler)


def random_delta(pipe, folder: Path) -> Path:
    """A to_k delta for every cross-attention layer (values perturbed, shapes exact)."""
    from sepen.delta import save_delta

    g = torch.Generator().manual_seed(1)
    tensors = {
        n: p.detach().float().cpu() + 1e-3 * torch.randn(p.shape, generator=g)
        for n, p in pipe.unet.named_parameters()
        if n.endswith("attn2.to_k.weight")
    }
    return save_delta(
        folder / "delta.safetensors",
        tensors,
        base_model="random",
        revision=None,
        trainable="to_k",
        config={},
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, run in turns (after one warm-up each) so that drift of
    the machine's speed affects all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


METHODS = {
    "stock": "stock diffusers",
    "sepen": "+ SepEn delta",
    "attend_excite": "A&E (sepen)",
    "sepen_test_time": "SepEn test-time",
    "attend_excite_diffusers": "A&E (diffusers)",
}


def run(arch: str, steps: int, repeats: int, device: str, dtype: str, batch: int = 1) -> dict:
    """Median seconds per call of each method on the same prompt and seeds (`batch` images per
    call); the test-time methods use the default config's settings, their schedule scaled to
    `steps`, at the architecture's 16x16 maps (tiny: 8x8)."""
    from sepen.config import load_config
    from sepen.delta import apply_delta
    from sepen.models import resolve_dtype
    from sepen.models.tiny import build_tiny_pipeline
    from sepen.sampling import sample
    from sepen.test_time import GuidanceMethod

    def build():
        pipe = sd14_pipeline() if arch == "sd14" else build_tiny_pipeline()
        pipe = pipe.to(device, resolve_dtype(dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    stock_pipe, sepen_pipe = build(), build()
    with tempfile.TemporaryDirectory() as tmp:
        apply_delta(sepen_pipe, random_delta(sepen_pipe, Path(tmp)))
    entry = {"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]}
    seeds = list(range(batch))
    config = load_config(None)
    config["sampling"]["steps"] = steps
    res = 16 if arch == "sd14" else 8
    config["evaluation"]["attend_excite"]["attention_res"] = res
    config["evaluation"]["sepen_test_time"]["resolutions"] = [res]
    guided = {
        m: GuidanceMethod.from_config(m, config) for m in ("attend_excite", "sepen_test_time")
    }
    positions = guided["attend_excite"].positions(stock_pipe, [entry])

    def plain(pipe):
        return lambda: sample(pipe, [entry["prompt"]] * batch, seeds, steps, 6.0, batch)

    def ours(method):
        return lambda: guided[method].sample(
            stock_pipe, [entry] * batch, positions * batch, seeds, 6.0
        )

    calls = {
        "stock": plain(stock_pipe),
        "sepen": plain(sepen_pipe),
        "attend_excite": ours("attend_excite"),
        "sepen_test_time": ours("sepen_test_time"),
    }
    try:  # diffusers' own pipeline (SD 1.x/2.x, deprecated), for comparison
        from diffusers import StableDiffusionAttendAndExcitePipeline

        ae = StableDiffusionAttendAndExcitePipeline.from_pipe(stock_pipe)
        ae.set_progress_bar_config(disable=True)
        schedule = guided["attend_excite"].schedule
        tokens = sorted({p for concept in positions[0] for p in concept})
        calls["attend_excite_diffusers"] = lambda: ae(
            [entry["prompt"]] * batch,
            token_indices=[tokens] * batch,
            attn_res=(res, res),
            num_inference_steps=steps,
            guidance_scale=6.0,
            max_iter_to_alter=schedule.update_steps,
            thresholds=schedule.thresholds,
            scale_factor=schedule.scale_factor,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        )
    except ImportError:
        pass
    seconds = timed_interleaved(calls, repeats, device)
    results = {
        "arch": arch,
        "device": device,
        "dtype": dtype,
        "steps": steps,
        "repeats": repeats,
        "batch": batch,
    }
    results.update({f"{k}_s": v for k, v in seconds.items()})
    if device == "cuda":
        results["card"] = torch.cuda.get_device_name()
    for k in seconds:
        results[f"{k}_images_per_s"] = batch / results[f"{k}_s"]
        if k != "stock":
            results[f"{k}_vs_stock"] = results[f"{k}_s"] / results["stock_s"]
            results[f"{k}_speed_vs_stock"] = results["stock_s"] / results[f"{k}_s"]
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["sd14", "tiny"], default="sd14")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1, help="images per call (same prompt, seeds 0..)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    r = run(args.arch, args.steps, args.repeats, args.device, args.dtype, args.batch)
    print(
        f"sampling cost per image, {r['arch']} architecture, {r['steps']} steps, "
        f"{r['device']} ({r.get('card', 'cpu')}), {r['dtype']}, {r['batch']} image(s) per call"
    )
    print(f"{'method':<18}{'s/call':>10}{'images/s':>10}{'x time':>8}{'x speed':>9}")
    for key, label in METHODS.items():
        if f"{key}_s" not in r:
            continue
        time_ratio = r.get(f"{key}_vs_stock", 1.0)
        speed_ratio = r.get(f"{key}_speed_vs_stock", 1.0)
        print(
            f"{label:<18}{r[key + '_s']:>10.3f}{r[key + '_images_per_s']:>10.3f}"
            f"{time_ratio:>8.2f}{speed_ratio:>9.2f}"
        )
    if args.json:
        from sepen.atomic import write_json

        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
