import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sepen.cli.finetune import cli, main, parse_args
from sepen.finetune.signal import SignalSampler, Task

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture()
def config(tmp_path, tiny_model):
    def write(**finetune):
        ft = dict(
            steps=3,
            batch_size=2,
            image_size=128,
            resolutions=[8],
            learning_rate=5e-4,
            checkpointing_steps=2,
            log_every=1,
        )
        ft.update(finetune)
        path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
        path.write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_model)}, "finetune": ft}))
        return path

    return write


def _launch(launcher: list[str], config_path, out):
    """`sepen finetune` under a multi-process launcher, one thread per process."""
    return subprocess.run(
        [
            *launcher,
            "-m",
            "sepen",
            "finetune",
            "--config",
            str(config_path),
            "--out",
            str(out),
            "--cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _run(*argv):
    return main(parse_args([str(a) for a in argv] + ["--cpu"]))


def test_pairs_finetune_writes_a_delta_of_the_keys_only(config, tmp_path, tiny_pipe):
    out = _run("--config", config(), "--out", tmp_path / "d.safetensors")
    delta = load_file(str(out))
    base = dict(tiny_pipe.unet.named_parameters())
    assert sorted(delta) == sorted(
        n for n in base if n.endswith("attn2.to_k.weight") and not n.startswith("up_blocks.2")
    )
    assert all((delta[n] - base[n]).abs().max() > 0 for n in delta)
    with open(tmp_path / "d.state" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["separate"]) <= 0.5 and 0 < float(r["enhance"]) <= 1 for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(5e-4 * 2)  # scaled by the global batch


@pytest.mark.parametrize(
    "mode",
    [{}, {"mode": "joint", "concepts": ["cat", "dog", "bird", "horse"]}],
    ids=["pairs", "joint"],
)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(config, tmp_path, mode):
    cfg = config(steps=5, checkpointing_steps=2, checkpoints_total_limit=2, **mode)
    whole = load_file(str(_run("--config", cfg, "--out", tmp_path / "a.safetensors")))
    _run("--config", cfg, "--out", tmp_path / "b.safetensors", "--stop-after", 3)
    assert not (tmp_path / "b.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "b.state").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = load_file(
        str(_run("--config", cfg, "--out", tmp_path / "b.safetensors", "--resume", "latest"))
    )
    assert sorted(whole) == sorted(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert sorted(p.name for p in (tmp_path / "b.state").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    with open(tmp_path / "b.state" / "losses.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]


def test_a_changed_finetuning_key_discards_the_old_checkpoints(config, tmp_path, caplog):
    """The README's "a changed config key" row for finetuning, in real runs: checkpoints of
    another learning rate are removed and the run starts from step 0, to the same delta as a
    fresh run; a bookkeeping key (the checkpoint interval) keeps them."""
    caplog.set_level("INFO")
    first = config(steps=5, checkpointing_steps=2)
    _run("--config", first, "--out", tmp_path / "b.safetensors", "--stop-after", 3)
    state = tmp_path / "b.state"
    assert [p.name for p in state.glob("checkpoint-*")] == ["checkpoint-2"]
    _run(
        "--config", config(steps=5, checkpointing_steps=3), "--out", tmp_path / "k.safetensors",
        "--state-dir", state, "--resume", "latest", "--stop-after", 3,
    )  # fmt: skip
    assert "resuming from" in caplog.text and "checkpoint-2 (step 2)" in caplog.text
    assert not (tmp_path / "k.safetensors").exists()
    caplog.clear()
    other = config(steps=5, checkpointing_steps=2, learning_rate=1e-3)
    resumed = _run("--config", other, "--out", tmp_path / "b.safetensors", "--resume", "latest")
    assert "from other settings: starting from step 0" in caplog.text
    assert "resuming" not in caplog.text
    fresh = _run("--config", other, "--out", tmp_path / "c.safetensors")
    a, b = load_file(str(resumed)), load_file(str(fresh))
    assert all(torch.equal(a[k], b[k]) for k in b)
    with open(state / "losses.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in state.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_resume_with_another_process_count_or_global_batch_is_an_error(
    config, tmp_path, monkeypatch
):
    """Checkpoints made by one process (global batch 2) are not resumed by two processes, nor
    with another batch size: a one-line error naming both shapes, before any training; the
    same shape resumes."""
    from sepen.errors import SepenError

    first = config(steps=5, checkpointing_steps=2)
    _run("--config", first, "--out", tmp_path / "b.safetensors", "--stop-after", 2)
    state = tmp_path / "b.state"
    stamp = json.loads((state / "run_settings.json").read_text())
    assert stamp["training"] == {"processes": 1, "global_batch": 2}
    losses = (state / "losses.csv").read_text()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a two-process launcher sets it
    with pytest.raises(SepenError) as error:
        _run("--config", first, "--out", tmp_path / "b.safetensors", "--resume", "latest")
    message = str(error.value)
    assert "made by 1 process(es) with a global batch of 2" in message
    assert "this run has 2 process(es) and a global batch of 4" in message
    assert "\n" not in message and "--state-dir" in message
    monkeypatch.delenv("WORLD_SIZE")
    bigger = config(steps=5, checkpointing_steps=2, batch_size=4)
    with pytest.raises(SepenError, match="this run has 1 process\\(es\\) and a global batch of 4"):
        _run("--config", bigger, "--out", tmp_path / "b.safetensors", "--resume", "latest")
    # nothing was trained or removed by the refused runs
    assert (state / "losses.csv").read_text() == losses
    assert [p.name for p in state.glob("checkpoint-*")] == ["checkpoint-2"]
    _run("--config", first, "--out", tmp_path / "b.safetensors", "--resume", "latest")
    assert (tmp_path / "b.safetensors").is_file()


def test_checkpoint_total_limit_keeps_the_newest(config, tmp_path):
    _run(
        "--config",
        config(steps=7, checkpointing_steps=2, checkpoints_total_limit=2),
        "--out",
        tmp_path / "d.safetensors",
    )
    assert sorted(p.name for p in (tmp_path / "d.state").glob("checkpoint-*")) == [
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_joint_mode_with_norm_loss_and_lora(config, tmp_path):
    cfg = config(
        mode="joint",
        concepts=["cat", "dog", "hippopotamus", "teddy bear"],
        trainable="lora",
        lora_rank=2,
        steps=2,
        learning_rate=1e-3,
    )
    out = _run("--config", cfg, "--out", tmp_path / "j.safetensors")
    delta = load_file(str(out))
    assert len(delta) == 14 and all(k.endswith(("lora_A", "lora_B")) for k in delta)
    with open(tmp_path / "j.state" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    # LoRA starts as the identity: no drift at step 1 (only float rounding), then some
    assert float(rows[0]["norm"]) < 1e-10
    assert float(rows[1]["norm"]) > 100 * float(rows[0]["norm"])


def test_signal_is_the_same_for_any_split_of_the_global_batch():
    ft = dict(
        mode="joint",
        concepts=["a", "b", "c"],
        templates=["{} and {}"],
        single_template="{}",
        seed=3,
        batch_size=1,
        gradient_accumulation_steps=2,
        norm_loss=True,
    )
    split = SignalSampler(Task.from_settings(ft), (4, 2, 2), 1000, 0.18, processes=2)
    whole = SignalSampler(
        Task.from_settings({**ft, "batch_size": 4, "gradient_accumulation_steps": 1}),
        (4, 2, 2),
        1000,
        0.18,
        processes=1,
    )
    full_pair, full_single = whole.step(5, 0, 0)
    for micro in range(2):
        for rank in range(2):
            pair, single = split.step(5, micro, rank)
            i = micro * 2 + rank
            assert pair.prompts == full_pair.prompts[i : i + 1]
            assert torch.equal(pair.latents, full_pair.latents[i : i + 1])
            assert torch.equal(single.timesteps, full_single.timesteps[i : i + 1])
    assert full_pair.latents.std().item() == pytest.approx(0.18, rel=0.5)  # randn * scale


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(config, tmp_path):
    two = _launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
        ],
        config(batch_size=1),
        tmp_path / "two.safetensors",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "trained weights identical on 2 process(es)" in two.stderr
    one = load_file(
        str(_run("--config", config(batch_size=2), "--out", tmp_path / "one.safetensors"))
    )
    two = load_file(str(tmp_path / "two.safetensors"))
    assert sorted(one) == sorted(two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5


LONG = "a " * 75


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.learning_rate=0", "finetune.learning_rate = 0 is invalid"),
        ("finetune.learning_rate=-1e-5", "finetune.learning_rate = -1e-05 is invalid"),
        ("finetune.steps=0", "finetune.steps = 0 is invalid"),
        (
            "finetune.stepz=10",
            "config key finetune: Additional properties are not allowed ('stepz' was unexpected)",
        ),
        (
            "finetune.templates=['a photo of {}s and {}s']",
            "concept 'cat' not found in prompt 'a photo of cats and dogs'",
        ),
        (
            f"finetune.templates=['{LONG}{{}} and a {{}}']",
            "concept 'cat' is cut off by the tokenizer's maximum length (77 tokens)",
        ),
        (
            "finetune.resolutions=[12]",
            "no cross-attention layer at resolution [12] for 16x16 latents; available: [16, 8, 4]",
        ),
        ("finetune.templates=['a {} and a {} and a {}']", "has 3 '{}' slots for 2 concepts"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(config, tmp_path, capsys, override, message):
    code = cli(
        [
            "--config",
            str(config()),
            "--set",
            override,
            "--out",
            str(tmp_path / "d.safetensors"),
            "--cpu",
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()
    assert not list((tmp_path / "d.state").glob("checkpoint-*"))


def test_gradient_accumulation_matches_the_same_global_batch_in_one_step(config, tmp_path):
    one = load_file(str(_run("--config", config(batch_size=2), "--out", tmp_path / "a.st")))
    accum = load_file(
        str(
            _run(
                "--config",
                config(batch_size=1, gradient_accumulation_steps=2),
                "--out",
                tmp_path / "b.st",
            )
        )
    )
    assert max((one[k] - accum[k]).abs().max().item() for k in one) <= 1e-5


def test_bf16_mixed_precision_trains_with_finite_losses(config, tmp_path):
    out = _run("--config", config(mixed_precision="bf16"), "--out", tmp_path / "m.safetensors")
    delta = load_file(str(out))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in delta.values())
    with open(tmp_path / "m.state" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(0 < float(r["loss"]) < 2 for r in rows)


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_on_cpu_runs_two_gloo_processes(config, tmp_path):
    done = _launch(
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            "29523",
        ],
        config(batch_size=1),
        tmp_path / "acc.safetensors",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 2, 2 process(es)" in done.stderr
    assert "trained weights identical on 2 process(es)" in done.stderr


def test_base_sample_signal_draws_prompts_and_latents_from_the_pool(config, tmp_path):
    from sepen.finetune.signal import Batch

    ft = dict(
        mode="joint",
        concepts=["a", "b", "c"],
        templates=["{} and {}"],
        single_template="{}",
        seed=0,
        batch_size=2,
        gradient_accumulation_steps=1,
        norm_loss=False,
    )
    pool = {
        "pair": Batch(
            ["a and b", "c and a"],
            [["a", "b"], ["c", "a"]],
            torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2)]),
            torch.zeros(0),
            torch.zeros(0),
        )
    }
    sampler = SignalSampler(Task.from_settings(ft), (4, 2, 2), 1000, 0.18, processes=1, pool=pool)
    for step in range(5):
        pair, _ = sampler.step(step, 0, 0)
        for prompt, latent in zip(pair.prompts, pair.latents):
            assert latent.eq(0.0 if prompt == "a and b" else 1.0).all()
    # end to end: the pool is sampled from the tiny model, then trained on
    out = _run(
        "--config",
        config(signal="base_samples", signal_pool=3),
        "--set",
        "sampling.steps=2",
        "--set",
        "sampling.batch_size=2",
        "--out",
        tmp_path / "b.safetensors",
    )
    assert load_file(str(out))
