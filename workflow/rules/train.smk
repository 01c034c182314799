# One rule trains every run of the matrix: the method and its settings travel as the run's JSON.
# resources.nproc_per_node > 1 (set in a profile) launches the same command under torchrun
# (data parallel, FSDP2); 1 runs a plain process.
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
    resources:
        nproc_per_node=1,
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{run}}.tsv"
    shell:
        "if [ {resources.nproc_per_node} -gt 1 ]; then"
        " launch='torchrun --standalone --nproc-per-node {resources.nproc_per_node}'; else launch=python; fi; "
        "$launch -m opdgeom train --spec {params.spec:q} {params.paths} --train-data {input.train_data} "
        "--seed {params.seed} --out {params.out} 2> {log}"
