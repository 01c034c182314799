# Each figure is a named target: `snakemake table1` rebuilds that figure and only what it needs.
rule table1:
    input:
        [str(STUDY.compare_table(run)) for run in STUDY.study_runs],
    output:
        figure_outputs("table1"),
    params:
        prefix=lambda wc, output: os.path.splitext(output[0])[0],
        options=json.dumps({"methods": json.loads(run_methods())}),
    conda:
        "../../envs/figures.yaml"
    log:
        f"{LOGS}/figures/table1.log",
    shell:
        "python -m opdgeom figure table1 --inputs {input} --out-prefix {params.prefix} --options {params.options:q} 2> {log}"


rule accuracy:
    input:
        [str(STUDY.eval_table(ref)) for ref in STUDY.eval_refs],
    output:
        figure_outputs("accuracy"),
    params:
        prefix=lambda wc, output: os.path.splitext(output[0])[0],
        options=accuracy_options(),
    conda:
        "../../envs/figures.yaml"
    log:
        f"{LOGS}/figures/accuracy.log",
    shell:
        "python -m opdgeom figure accuracy --inputs {input} --out-prefix {params.prefix} --options {params.options:q} 2> {log}"
