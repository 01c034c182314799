# One rule trains every run of the matrix: the method and its settings travel as the run's JSON.
# The launch follows the resources a profile sets: nproc_per_node > 1 runs torchrun on one node
# (data parallel, FSDP2); nodes > 1 runs one torchrun per node through srun, rendezvous on the
# first node (with the plugin's `mpi: srun`, the job runs this shell once, on that node);
# otherwise a plain process.
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
        "../../envs/train.yaml"
    resources:
        nodes=1,
        nproc_per_node=1,
    params:
        spec=lambda wc: json.dumps(STUDY.runs[wc.run].to_json()),
        paths=run_flags,
        out=lambda wc: str(STUDY.run_dir(wc.run)),
        seed=STUDY.seed,
    shell:
        "if [ {resources.nodes} -gt 1 ]; then"
        ' launch="srun -n {resources.nodes} --ntasks-per-node=1 torchrun --nnodes={resources.nodes}'
        ' --nproc-per-node={resources.nproc_per_node} --rdzv-backend=c10d --rdzv-endpoint=$(hostname):29500";'
        " elif [ {resources.nproc_per_node} -gt 1 ]; then"
        " launch='torchrun --standalone --nproc-per-node {resources.nproc_per_node}'; else launch=python; fi; "
        "$launch -m opdgeom train --spec {params.spec:q} {params.paths} --train-data {input.train_data} "
        "--seed {params.seed} --out {params.out} 2> {log}"
