rule tokenizer:
    output:
        directory(f"{RES}/tokenizer"),
    log:
        f"{LOGS}/tokenizer.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m opdgeom tokenizer --out {output} 2> {log}"


rule data:
    input:
        unpack(data_inputs),
    output:
        sft=f"{RES}/data/{{domain}}/sft.jsonl",
        train=f"{RES}/data/{{domain}}/train.jsonl",
        eval=f"{RES}/data/{{domain}}/eval.jsonl",
    log:
        f"{LOGS}/data/{{domain}}.log",
    conda:
        "../../envs/train.yaml"
    params:
        n_train=STUDY.data["n_train"],
        n_eval=STUDY.data["n_eval"],
        seed=STUDY.seed,
        sources=data_source_flags,
    shell:
        "python -m opdgeom data --domain {wildcards.domain} --n-train {params.n_train} --n-eval {params.n_eval} "
        "--seed {params.seed} --sft-out {output.sft} --train-out {output.train} --eval-out {output.eval} "
        "{params.sources} 2> {log}"


rule pretrain_corpus:
    output:
        f"{RES}/data/pretrain.jsonl",
    log:
        f"{LOGS}/pretrain_corpus.log",
    conda:
        "../../envs/train.yaml"
    params:
        n_docs=lambda wc: 4 * STUDY.family["pretrain"]["steps"] * STUDY.family["pretrain"]["batch_size"],
        seq_len=STUDY.family.get("pretrain", {}).get("seq_len", 0),
        seed=STUDY.seed,
    shell:
        "python -m opdgeom corpus --n-docs {params.n_docs} --seq-len {params.seq_len} --seed {params.seed} "
        "--out {output} 2> {log}"


rule benchmark_data:
    output:
        f"{RES}/data/bench/{{benchmark}}.jsonl",
    log:
        f"{LOGS}/data/bench/{{benchmark}}.log",
    conda:
        "../../envs/train.yaml"
    params:
        source=lambda wc: json.dumps(STUDY.benchmark_source(wc.benchmark)),
        family=STUDY.name,
    shell:
        "python -m opdgeom benchmark-data --source {params.source:q} --family {params.family} --out {output} 2> {log}"
