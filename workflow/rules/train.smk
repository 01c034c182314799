# One rule trains every run of the matrix: the method and its settings travel as the run's JSON.
# Its resources follow the family (opdgeom.plan.TrainResources: one process for tiny families,
# whole GPU nodes for hub ones; a profile may still override them), and the package picks the
# launcher from them (opdgeom.launch: python, torchrun on one node, srun + torchrun across nodes, with
# each rank's share of the node's CPUs as its thread count).
rule train:
    input:
        unpack(run_inputs),
    output:
        f"{RES}/runs/{{run}}/manifest.json",
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{run}}.tsv"
    conda:
        train_env
    resources:
        **TRAIN_RESOURCES,
    params:
        software=lambda wc: software(train_env(wc)),
        launch=lambda wc, resources, threads: launch_command(
            resources.nodes, resources.nproc_per_node, resources.get("cpus_per_task", threads)
        ),
        spec=lambda wc: json.dumps(STUDY.runs[wc.run].to_json()),
        paths=run_flags,
        out=lambda wc: str(STUDY.run_dir(wc.run)),
        seed=lambda wc: STUDY.run_seed(wc.run),
        watch=watch_flags(),
    shell:
        "echo {params.software:q} > {log}; "
        "{params.launch} -m opdgeom train --spec {params.spec:q} {params.paths} --train-data {input.train_data} "
        "--seed {params.seed} --out {params.out} {params.watch} 2>> {log}"
