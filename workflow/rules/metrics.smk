# Metrics per sampling shard, then aggregation with bootstrap CIs and paired differences.


rule metrics:
    input:
        plan=f"{R}/prompts.json",
        manifest=f"{R}/samples/{{method}}/shard-{{shard}}.json",
    output:
        f"{R}/metrics/{{method}}/shard-{{shard}}.json",
    log:
        f"{LOGS}/metrics/{{method}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/metrics/{{method}}-{{shard}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000 if TOY else 16000,
        runtime=30 if TOY else 120,
        gpu=GPU,
    params:
        config=CONFIG,
        config_keys=step_params(CFG, "metrics"),
        code=code_hash("metrics"),
    shell:
        "python -m sepen metrics --config {params.config} --plan {input.plan}"
        " --manifest {input.manifest} --out {output} 2> {log}"


rule fid:
    input:
        manifests=lambda wildcards: [
            f"{R}/samples/{wildcards.method}/shard-{s}.json" for s in SHARDS
        ],
    output:
        f"{R}/fid/{{method}}.json",
    log:
        f"{LOGS}/fid/{{method}}.log",
    benchmark:
        f"{BENCH}/fid/{{method}}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPU,
    params:
        config=CONFIG,
        config_keys=step_params(CFG, "fid"),
        code=code_hash("fid"),
    shell:
        "python -m sepen fid --config {params.config} --manifests {input.manifests}"
        " --out {output} 2> {log}"


rule aggregate:
    input:
        plan=f"{R}/prompts.json",
        metrics=metric_files(),
        manifests=manifests(),
        fid=fid_files(),
    output:
        full=f"{R}/metrics.json",
        dvc=f"{R}/metrics_summary.json",
        table=f"{R}/plots/metrics.csv",
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{BENCH}/aggregate.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        config=CONFIG,
        fid=lambda wildcards, input: (
            " --fid " + " ".join(input.fid) if input.fid else ""
        ),
        metrics_dir=lambda wildcards, input: os.path.join(
            os.path.dirname(input.plan), "metrics"
        ),
        samples_dir=lambda wildcards, input: os.path.join(
            os.path.dirname(input.plan), "samples"
        ),
        config_keys=step_params(CFG, "aggregate"),
        code=code_hash("aggregate"),
    shell:
        "python -m sepen aggregate --config {params.config} --plan {input.plan}"
        " --metrics-dir {params.metrics_dir} --samples-dir {params.samples_dir}{params.fid}"
        " --out {output.full} --dvc-metrics {output.dvc}"
        " --table {output.table} 2> {log}"
