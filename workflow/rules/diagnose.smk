# Diagnostics read checkpoints tensor by tensor; spectra are cached by content in cache_dir, so the
# anchor's statistics are computed once and reused by every run, figure and family that shares it.
rule compare:
    input:
        manifest=f"{RES}/runs/{{run}}/manifest.json",
    output:
        f"{RES}/diagnose/compare/{{run}}.parquet",
    log:
        f"{LOGS}/diagnose/compare/{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/diagnose/compare/{{run}}.tsv"
    conda:
        "../../envs/diagnose.yaml"
    params:
        init=lambda wc: STUDY.ref_path(STUDY.runs[wc.run].init),
        final=lambda wc: STUDY.final_checkpoint(wc.run),
        step=lambda wc: STUDY.runs[wc.run].train.steps,
        d=DIAGNOSE,
        cache=CACHE,
    shell:
        "python -m opdgeom compare {params.init} {params.final} --run {wildcards.run} --step {params.step} "
        "--k {params.d[k]} --alpha {params.d[alpha]} --eta {params.d[eta]} --device {params.d[device]} "
        "--cache {params.cache} --out {output} 2> {log}"


rule trajectory:
    input:
        manifest=f"{RES}/runs/{{run}}/manifest.json",
    output:
        f"{RES}/diagnose/trajectory/{{run}}.parquet",
    log:
        f"{LOGS}/diagnose/trajectory/{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/diagnose/trajectory/{{run}}.tsv"
    conda:
        "../../envs/diagnose.yaml"
    params:
        run_dir=lambda wc, input: os.path.dirname(input.manifest),
        d=DIAGNOSE,
        cache=CACHE,
    shell:
        "python -m opdgeom trajectory {params.run_dir} --k {params.d[trajectory_k]} --device {params.d[device]} "
        "--cache {params.cache} --out {output} 2> {log}"


# The subspace a projected run trains in: top-k right singular vectors of its reference run's update.
rule basis:
    input:
        manifest=f"{RES}/runs/{{ref}}/manifest.json",
    output:
        f"{RES}/diagnose/basis/{{ref}}.step{{step}}.rank{{rank}}.safetensors",
    log:
        f"{LOGS}/diagnose/basis/{{ref}}.step{{step}}.rank{{rank}}.log",
    wildcard_constraints:
        step=r"\d{6}",
        rank=r"\d+",
    conda:
        "../../envs/diagnose.yaml"
    params:
        init=lambda wc: STUDY.ref_path(STUDY.runs[wc.ref].init),
        checkpoint=lambda wc: STUDY.checkpoint_dir(wc.ref, int(wc.step)),
    shell:
        "python -m opdgeom basis {params.init} {params.checkpoint} --rank {wildcards.rank} --out {output} 2> {log}"
