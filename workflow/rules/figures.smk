# Each figure is a named target: `snakemake table1` rebuilds that figure and only what it needs.
rule table1:
    input:
        [str(STUDY.sparsity_table(run)) for run in STUDY.study_runs],
    output:
        figure_outputs("table1"),
    params:
        prefix=str(STUDY.figure("table1", "")).rstrip("."),
        options=json.dumps({"methods": json.loads(run_methods())}),
    log:
        f"{LOGS}/figures/table1.log",
    shell:
        "opdgeom figure table1 --inputs {input} --out-prefix {params.prefix} --options {params.options:q} 2> {log}"


rule accuracy:
    input:
        [str(STUDY.eval_table(ref)) for ref in STUDY.eval_refs],
    output:
        figure_outputs("accuracy"),
    params:
        prefix=str(STUDY.figure("accuracy", "")).rstrip("."),
        options=accuracy_options(),
    log:
        f"{LOGS}/figures/accuracy.log",
    shell:
        "opdgeom figure accuracy --inputs {input} --out-prefix {params.prefix} --options {params.options:q} 2> {log}"
