# Tiny families: build from a transformers config and pretrain briefly on a generic corpus.
# Hub families: download a pinned revision. Both end as HF folders with safetensors. Neither needs a
# GPU (a download, hard links into the HF cache; tiny pretraining runs on the CPU): the Slurm profile
# gives this rule CPU resources.
rule model:
    input:
        unpack(model_inputs),
    output:
        directory(f"{RES}/models/{{model}}"),
    log:
        f"{LOGS}/model/{{model}}.log",
    benchmark:
        f"{RES}/benchmarks/model/{{model}}.tsv"
    conda:
        env_file("train.yaml")
    params:
        software=software(env_file("train.yaml")),
        spec=model_spec,
        pretrain=json.dumps(STUDY.family.get("pretrain", {})),
        seed=STUDY.seed,
        sources=lambda wc, input: " ".join(f"--{k} {v}" for k, v in input.items()),
    shell:
        "echo {params.software:q} > {log}; "
        "python -m opdgeom model --spec {params.spec:q} --pretrain {params.pretrain:q} {params.sources} "
        "--seed {params.seed} --out {output} 2>> {log}"
