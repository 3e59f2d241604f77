"""`sepen finetune`'s plan options, checked before any work."""


def test_finetune_plan_options_are_checked_before_any_work(toy_setup, capsys):
    from sepen.cli.finetune import cli

    base = ["--config", str(toy_setup["config"]), "--out", str(toy_setup["dir"] / "d.safetensors")]
    assert cli([*base, "--plan", str(toy_setup["plan_path"])]) == 2
    assert "--plan and --model-id go together" in capsys.readouterr().err
    assert cli([*base, "--plan", str(toy_setup["plan_path"]), "--model-id", "cat-dog"]) == 2
    assert "model id 'cat-dog' is not in plan" in capsys.readouterr().err
    assert not (toy_setup["dir"] / "d.state").exists()
