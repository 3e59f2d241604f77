# The toy world's premise check (attention on the own object, before and after SepEn) and
# its SepEn settings study (in the DAG only when toy.study.run is true).


rule toy_premise:
    input:
        BASE_INPUT,
        delta=premise_delta(),
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
        delta=lambda wildcards, input: f" --delta {input.delta}" if input.delta else "",
        config_keys=step_params(CFG, "toy_premise"),
    shell:
        "python -m sepen toy premise --config {params.config}{params.model}{params.delta}"
        " --out {output} 2> {log}"


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
        images=CFG["toy"]["study"]["images"],
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        config_keys=step_params(CFG, "toy_study"),
    shell:
        "python -m sepen toy study --config {params.config} --grid {input.grid}"
        " --images {params.images} --out-dir {params.out_dir} 2> {log}"
