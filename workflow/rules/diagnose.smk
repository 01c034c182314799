rule sparsity:
    input:
        manifest=f"{RES}/runs/{{run}}/manifest.json",
    output:
        f"{RES}/diagnose/sparsity/{{run}}.parquet",
    conda:
        "../../envs/diagnose.yaml"
    log:
        f"{LOGS}/diagnose/sparsity/{{run}}.log",
    shell:
        "python -m opdgeom sparsity --manifest {input.manifest} --run {wildcards.run} --out {output} 2> {log}"
