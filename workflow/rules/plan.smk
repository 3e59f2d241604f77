# Concept lists -> prompt sets, seeds and the models to finetune (the plan).


rule concepts:
    input:
        plan_data(),
    output:
        f"{R}/concepts.json",
    log:
        f"{LOGS}/concepts.log",
    benchmark:
        f"{BENCH}/concepts.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        config=CONFIG,
        config_keys=step_params(CFG, "concepts"),
        code=code_hash("concepts"),
    shell:
        "python -m sepen concepts --config {params.config} --out {output} 2> {log}"


rule prompts:
    input:
        plan_data(),
        concepts=f"{R}/concepts.json",
    output:
        f"{R}/prompts.json",
    log:
        f"{LOGS}/prompts.log",
    benchmark:
        f"{BENCH}/prompts.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        config=CONFIG,
        config_keys=step_params(CFG, "prompts"),
        code=code_hash("prompts"),
    shell:
        "python -m sepen prompts --config {params.config} --concepts {input.concepts} --out {output}"
        " 2> {log}"
