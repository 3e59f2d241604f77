# The toy world's premise check (attention on the detected objects of sampled images, and
# how well SepEn's values predict failure; base and SepEn) and
# its SepEn settings study (in the DAG only when toy.study.run is true).


rule toy_premise:
    input:
        BASE_INPUT,
        plan=f"{R}/prompts.json",
        deltas=premise_deltas(),
    output:
        f"{R}/premise.json",
    log:
        f"{LOGS}/toy_premise.log",
    benchmark:
        f"{BENCH}/toy_premise.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
        gpu=0,
    params:
        config=CONFIG,
        model=MODEL_ARG,
        model_dir=lambda wildcards, input: (
            f" --deltas-dir {R}/models" if input.deltas else ""
        ),
        config_keys=step_params(CFG, "toy_premise"),
        code=code_hash("toy_premise"),
    shell:
        "python -m sepen toy premise --config {params.config}{params.model} --plan {input.plan}"
        "{params.model_dir} --out {output} 2> {log}"


rule toy_study:
    input:
        BASE_INPUT,
        grid=CFG["toy"]["study"]["grid"],
    output:
        f"{R}/study/study.json",
    log:
        f"{LOGS}/toy_study.log",
    benchmark:
        f"{BENCH}/toy_study.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=600,
        gpu=0,
    params:
        config=CONFIG,
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        config_keys=step_params(CFG, "toy_study"),
        code=code_hash("toy_study"),
    shell:
        "python -m sepen toy study --config {params.config} --cells {input.grid}"
        " --out-dir {params.out_dir} 2> {log}"
