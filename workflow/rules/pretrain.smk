# The toy world's base model, trained in the DAG when toy.pretrain.run is true
# (otherwise the shipped model.pretrained is used).


rule toy_pretrain:
    input:
        # toy.pretrain.init: the model a longer training starts from
        [CFG["toy"]["pretrain"]["init"]] if CFG["toy"]["pretrain"]["init"] else [],
    output:
        directory(f"{R}/toy_base"),
    log:
        f"{LOGS}/toy_pretrain.log",
    benchmark:
        f"{BENCH}/toy_pretrain.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=0,
    params:
        config=CONFIG,
        config_keys=step_params(CFG, "toy_pretrain"),
        code=code_hash("toy_pretrain"),
    shell:
        "python -m sepen toy pretrain --config {params.config} --out {output}"
        " --resume latest 2> {log}"


# The world card of the base model (sepen toy card), when toy.card.run is true; otherwise the
# report shows the card shipped beside model.pretrained.
rule toy_card:
    input:
        model=BASE,
    output:
        f"{R}/world_card.json",
    log:
        f"{LOGS}/toy_card.log",
    benchmark:
        f"{BENCH}/toy_card.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    params:
        config=CONFIG,
        config_keys=step_params(CFG, "toy_card"),
        code=code_hash("toy_card"),
    shell:
        "python -m sepen toy card --config {params.config} --model {input.model} --out {output}"
        " 2> {log}"
