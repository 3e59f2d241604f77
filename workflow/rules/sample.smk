# Sampling: one job per method and shard; images go to results/<experiment>/samples/<method>/
# shard-<k>/ and an interrupted shard re-run keeps the images it already has.


rule sample:
    input:
        BASE_INPUT,
        shard_models,
        plan=f"{R}/prompts.json",
    output:
        f"{R}/samples/{{method}}/shard-{{shard}}.json",
    log:
        f"{LOGS}/sample/{{method}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/sample/{{method}}-{{shard}}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000 if TOY else 16000,
        runtime=30 if TOY else 240,
        gpu=GPU,
    params:
        config=CONFIG,
        model=MODEL_ARG,
        shards=len(SHARDS),
        model_dir=f"{R}/models",
        images_dir=lambda wildcards: f"{R}/samples/{wildcards.method}/shard-{wildcards.shard}",
        config_keys=step_params(CFG, "sample"),
        code=code_hash("sample"),
    shell:
        "python -m sepen sample --config {params.config}{params.model} --plan {input.plan}"
        " --method {wildcards.method} --shard {wildcards.shard} --shards {params.shards}"
        " --deltas-dir {params.model_dir} --images-dir {params.images_dir} --out {output}"
        " 2> {log}"
