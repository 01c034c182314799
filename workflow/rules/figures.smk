# One rule per figure, named after it: `snakemake fig4a` rebuilds that figure from its runs' tables
# and nothing else. What each figure draws and its options come from the plan (config `figures:`).
for _figure in STUDY.figures:

    rule:
        name:
            _figure
        input:
            [str(p) for p in STUDY.figure_inputs(_figure)],
        output:
            [
                (
                    report(str(p), caption=f"../report/{_figure}.rst", category="Figures")
                    if str(p).endswith((".png", ".html"))
                    else str(p)
                )
                for p in STUDY.figure_outputs(_figure)
            ],
        log:
            f"{LOGS}/figures/{STUDY.figures[_figure].stem}.log",
        conda:
            "../../envs/figures.yaml"
        params:
            name=STUDY.figures[_figure].kind,
            prefix=lambda wc, output: os.path.splitext(output[0])[0],
            options=json.dumps(STUDY.figure_options(_figure)),
        shell:
            "python -m opdgeom figure {params.name} --inputs {input} --out-prefix {params.prefix} "
            "--options {params.options:q} 2> {log}"
