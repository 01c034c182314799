# One rule trains every run of the matrix: the method and its settings travel as the run's JSON.
rule train:
    input:
        unpack(run_inputs),
    output:
        f"{RES}/runs/{{run}}/manifest.json",
    params:
        spec=lambda wc: json.dumps(STUDY.runs[wc.run].to_json()),
        paths=run_flags,
        out=lambda wc: str(STUDY.run_dir(wc.run)),
        seed=STUDY.seed,
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{run}}.tsv"
    shell:
        "python -m opdgeom train --spec {params.spec:q} {params.paths} --train-data {input.train_data} "
        "--seed {params.seed} --out {params.out} 2> {log}"
