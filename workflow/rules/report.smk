# The report's table and figures; `snakemake --report results/report.html` embeds them.


rule report_table:
    input:
        **table_inputs(),
    output:
        report(
            f"{R}/report/metrics.html",
            caption="../report/metrics.rst",
            category="1. Metrics",
        ),
    log:
        f"{LOGS}/report_table.log",
    benchmark:
        f"{BENCH}/report_table.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        config=CONFIG,
        options=table_options,
        config_keys=step_params(CFG, "report_table"),
        code=code_hash("report_table"),
    shell:
        "python -m sepen report table --config {params.config} --metrics {input.metrics}"
        "{params.options} --out {output} 2> {log}"


rule report_landing:
    input:
        metrics=f"{R}/metrics.json",
        card=card_file(),
        description="workflow/report/workflow.rst",
    output:
        f"{R}/report/landing.rst",
    log:
        f"{LOGS}/report_landing.log",
    benchmark:
        f"{BENCH}/report_landing.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        card=lambda wildcards, input: f" --card {input.card}" if input.card else "",
        code=code_hash("report_landing"),
    shell:
        "python -m sepen report landing --metrics {input.metrics}{params.card}"
        " --description {input.description} --out {output} 2> {log}"


rule report_grid:
    input:
        plan=f"{R}/prompts.json",
        manifests=manifests(),
    output:
        report(
            f"{R}/report/samples.png",
            caption="../report/samples.rst",
            category="2. Samples",
        ),
    log:
        f"{LOGS}/report_grid.log",
    benchmark:
        f"{BENCH}/report_grid.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        config=CONFIG,
        samples_dir=lambda wildcards, input: os.path.join(
            os.path.dirname(input.plan), "samples"
        ),
        config_keys=step_params(CFG, "report_grid"),
        code=code_hash("report_grid"),
    shell:
        "python -m sepen report grid --config {params.config} --plan {input.plan}"
        " --samples-dir {params.samples_dir} --out {output} 2> {log}"


rule report_taxonomy:
    input:
        f"{R}/metrics.json",
    output:
        report(
            f"{R}/report/taxonomy.png",
            caption="../report/taxonomy.rst",
            category="1. Metrics",
        ),
    log:
        f"{LOGS}/report_taxonomy.log",
    benchmark:
        f"{BENCH}/report_taxonomy.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    params:
        code=code_hash("report_taxonomy"),
    shell:
        "python -m sepen report taxonomy --metrics {input} --out {output} 2> {log}"


rule report_losses:
    input:
        plan=f"{R}/prompts.json",
        logs=expand(f"{R}/losses/{{model}}.csv", model=MODELS),
    output:
        figure=report(
            f"{R}/report/losses.png",
            caption="../report/losses.rst",
            category="3. Finetuning",
        ),
        table=f"{R}/plots/losses.csv",
    log:
        f"{LOGS}/report_losses.log",
    benchmark:
        f"{BENCH}/report_losses.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    params:
        losses_dir=lambda wildcards, input: os.path.join(
            os.path.dirname(input.plan), "losses"
        ),
        code=code_hash("report_losses"),
    shell:
        "python -m sepen report losses --plan {input.plan} --losses-dir {params.losses_dir}"
        " --out {output.figure} --table {output.table} 2> {log}"


rule report_attention:
    input:
        BASE_INPUT,
        plan=f"{R}/prompts.json",
        deltas=attention_models(),
    output:
        report(
            f"{R}/report/attention.png",
            caption="../report/attention.rst",
            category="3. Finetuning",
        ),
    log:
        f"{LOGS}/report_attention.log",
    benchmark:
        f"{BENCH}/report_attention.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000 if TOY else 16000,
        runtime=10 if TOY else 60,
        gpu=GPU,
    params:
        config=CONFIG,
        model=MODEL_ARG,
        model_dir=lambda wildcards, input: os.path.join(
            os.path.dirname(input.plan), "models"
        ),
        config_keys=step_params(CFG, "report_attention"),
        code=code_hash("report_attention"),
    shell:
        "python -m sepen report attention --config {params.config}{params.model} --plan {input.plan}"
        " --deltas-dir {params.model_dir} --out {output} 2> {log}"
