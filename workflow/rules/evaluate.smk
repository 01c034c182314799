rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        f"{RES}/eval/{{ref}}.parquet",
    log:
        f"{LOGS}/evaluate/{{ref}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{ref}}.tsv"
    conda:
        eval_env
    resources:
        gpu=STUDY.evaluate.get("gpus", 1),
    params:
        software=lambda wc: software(eval_env(wc)),
        source=eval_source,
        domain=lambda wc: eval_domain(wc.ref),
        max_new_tokens=STUDY.evaluate["max_new_tokens"],
        batch_size=STUDY.evaluate["batch_size"],
        teacher=lambda wc: STUDY.ref_path(eval_teacher(wc.ref)),
        temperature=STUDY.train_defaults["temperature"],
        samples=STUDY.evaluate.get("samples", 1),
        engine=STUDY.evaluate.get("engine", "hf"),
        budget=eval_budget_flags(),
        decoding=STUDY.eval_decoding_flags(),
        tracker=lambda wc: STUDY.eval_tracker_flags(wc.ref),
        cache=CACHE,
        formats=lambda wc: f"--prompt-format {STUDY.prompt_format(wc.ref)} "
        f"--teacher-prompt-format {STUDY.prompt_format(eval_teacher(wc.ref))}",
    shell:
        "echo {params.software:q} > {log}; "
        "python -m opdgeom evaluate --ref {wildcards.ref} {params.source} --eval-data {input.eval_data} "
        "--domain {params.domain} --max-new-tokens {params.max_new_tokens} "
        "--batch-size {params.batch_size} --teacher {params.teacher} --temperature {params.temperature} --samples {params.samples} {params.formats} --engine {params.engine} {params.budget} {params.decoding} {params.tracker}"
        "--cache {params.cache} --out {output} 2>> {log}"


# Held-out benchmarks (family key benchmarks: MATH-500, AIME 2024, GSM8K on the hub presets): every
# checkpoint of a reference, accuracy with the benchmark's own decoding (greedy or avg@k), no teacher.
rule benchmark:
    input:
        model=lambda wc: str(STUDY.ref_marker(wc.ref)),
        eval_data=lambda wc: str(STUDY.benchmark_file(wc.benchmark)),
    output:
        f"{RES}/eval/bench/{{benchmark}}/{{ref}}.parquet",
    log:
        f"{LOGS}/benchmark/{{benchmark}}/{{ref}}.log",
    benchmark:
        f"{RES}/benchmarks/benchmark/{{benchmark}}/{{ref}}.tsv"
    conda:
        eval_env
    resources:
        gpu=STUDY.evaluate.get("gpus", 1),
    params:
        software=lambda wc: software(eval_env(wc)),
        source=eval_source,
        domain=lambda wc: STUDY.benchmarks[wc.benchmark].domain,
        decoding=lambda wc: STUDY.benchmarks[wc.benchmark].flags(),
        batch_size=STUDY.evaluate["batch_size"],
        engine=STUDY.evaluate.get("engine", "hf"),
        budget=eval_budget_flags(),
        cache=CACHE,
        formats=lambda wc: f"--prompt-format {STUDY.prompt_format(wc.ref)}",
    shell:
        "echo {params.software:q} > {log}; "
        "python -m opdgeom evaluate --ref {wildcards.ref} {params.source} --eval-data {input.eval_data} "
        "--domain {params.domain} {params.decoding} --batch-size {params.batch_size} {params.formats} "
        "--engine {params.engine} {params.budget} --cache {params.cache} --out {output} 2>> {log}"
