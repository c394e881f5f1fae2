"""DVC stage `sweep`: writes the search space from params.yaml (fixed `side` values + `sweep.space`)
and runs `lst sweep` on the cache."""

from pathlib import Path

import yaml

from stages.common import cache_path, params, run_lst

OUT = Path("runs/sweep")


def main() -> None:
    p = params()
    s = p["sweep"]
    space = {**{k: v for k, v in (p.get("side") or {}).items()}, **s["space"]}
    OUT.mkdir(parents=True, exist_ok=True)
    space_file = OUT / "space.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    run_lst(["sweep", "--cache", cache_path(p), "--space", str(space_file), "--out", str(OUT),
             "--trials", str(s["trials"]), "--sampler", s["sampler"], "--pruner", s["pruner"],
             "--parallel", str(s["parallel"]), "--seed", str(s["seed"]),
             "--reader-memory", str(s.get("reader_memory", "512MB")), "--json"], p.get("data_dir"))


if __name__ == "__main__":
    main()
