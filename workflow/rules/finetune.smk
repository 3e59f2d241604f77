# SepEn finetuning: one job per model of the plan (per pair, or one joint model).
# Checkpoints live in results/<experiment>/state/<model> (not an output: a re-run resumes from
# the newest complete one).


rule finetune:
    input:
        BASE_INPUT,
        plan=f"{R}/prompts.json",
    output:
        delta=f"{R}/models/{{model}}.safetensors",
        losses=f"{R}/losses/{{model}}.csv",
    log:
        f"{LOGS}/finetune/{{model}}.log",
    benchmark:
        f"{BENCH}/finetune/{{model}}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        **finetune_resources(),
    params:
        launch=finetune_launcher,
        config=CONFIG,
        model=MODEL_ARG,
        state=lambda wildcards: f"{R}/state/{wildcards.model}",
        config_keys=step_params(CFG, "finetune"),
        code=code_hash("finetune"),
    shell:
        "{params.launch} --config {params.config}{params.model} --plan {input.plan}"
        " --model-id {wildcards.model} --out {output.delta} --losses-out {output.losses}"
        " --state-dir {params.state} --resume latest 2> {log}"
