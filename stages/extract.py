"""DVC stage `extract`: stage one on the params.yaml dataset and backbone (resumes if interrupted)."""

from stages.common import cache_path, params, run_lst


def main() -> None:
    p = params()
    e = p["extract"]
    args = ["extract", "--backbone", e["backbone"], "--dataset", e["dataset"], "--out", cache_path(p),
            "--codec", e["codec"], "--layers", str(e["layers"]), "--max-length", str(e["max_length"]),
            "--shard-tokens", str(e["shard_tokens"]), "--batch-tokens", str(e["batch_tokens"]), "--json"]
    if e.get("compression"):
        args += ["--compression", str(e["compression"])]
    if e.get("max_examples"):
        args += ["--max-examples", str(e["max_examples"])]
    if e.get("dropout_draws"):
        args += ["--dropout-draws", str(e["dropout_draws"])]
    if e.get("label_words"):
        args += ["--label-words", str(e["label_words"])]
    run_lst(args, p.get("data_dir"))


if __name__ == "__main__":
    main()
