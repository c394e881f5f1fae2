"""`lst bench table-merge`: rows composed from several `lst bench table` JSON files, every number read
from them (means over seeds, the largest peak, the comparisons the paper's table asks for)."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.bench.table_merge import load_spec, run_table_merge
from pipeline.errors import UserError


def _table(path, method: str, runs: dict[str, tuple[float, float, float]], train_args=()) -> str:
    """A table JSON as `lst bench table` writes it: per task (score, above-baseline MB, epoch s)."""
    tasks = {t: {"methods": {method: {"score": sc, "above_baseline_mb": mb, "abs_mb": mb + 300.0,
                                      "trainable_pct": 1.4, "epoch_s": es, "epochs_run": 2}}}
             for t, (sc, mb, es) in runs.items()}
    path.write_text(json.dumps({"config": {"train_args": list(train_args)}, "methods": {method: {}}, "tasks": tasks}))
    return path.name


def _spec(tmp_path, rows, tasks=("sst2", "cola")) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({"title": "t", "backbone": "minilm", "device": "cpu", "tag": "merged",
                                 "tasks": list(tasks), "notes": "n", "rows": rows}))
    return str(p)


def test_rows_average_seeds_and_compare_with_full_and_lora(tmp_path):
    full = _table(tmp_path / "full.json", "full", {"sst2": (86.0, 3000.0, 100.0), "cola": (20.0, 2500.0, 40.0)})
    full1 = _table(tmp_path / "full1.json", "full", {"cola": (24.0, 2600.0, 44.0)}, ["--seed", "1"])
    lora = _table(tmp_path / "lora.json", "lora", {"sst2": (84.0, 2000.0, 90.0), "cola": (0.0, 1900.0, 30.0)})
    lst = _table(tmp_path / "lst.json", "cached", {"sst2": (85.0, 300.0, 20.0), "cola": (19.0, 250.0, 8.0)})
    spec = _spec(tmp_path, [{"label": "Full", "method": "full", "files": [full, full1]},
                            {"label": "LoRA", "method": "lora", "files": lora},  # a single file as a string
                            {"label": "LST", "method": "cached", "files": [lst], "offset": [-3, 2]}])
    res = run_table_merge(spec, tmp_path, command="lst bench table-merge spec.yaml")
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["Full"]["scores"] == {"sst2": 86.0, "cola": 22.0} and rows["Full"]["average"] == 54.0
    assert rows["Full"]["seeds"] == {"sst2": [0], "cola": [0, 1]}
    assert rows["Full"]["peak_above_baseline_mb"] == 3000.0 and rows["Full"]["peak_abs_mb"] == 3300.0
    assert rows["Full"]["train_s"] == 200.0 + 84.0  # per task the seeds' mean of epoch_s x epochs
    assert rows["LST"]["offset"] == [-3, 2]
    c = res["comparisons"]["LST"]
    assert c == {"lowest_peak_except_probe": True, "minus_full_avg": 52.0 - 54.0, "minus_lora_avg": 52.0 - 42.0}
    md = (tmp_path / "table-minilm-cpu-merged.md").read_text()
    assert "| Full | 2 | 1.400 | 3000 | 284 | 86.0 | 22.0 (2) | 54.0 |" in md
    assert "`full.json`, `full1.json`" in md and "full average -2.00" in md
    assert (tmp_path / "table-minilm-cpu-merged.png").stat().st_size > 0
    assert json.loads((tmp_path / "table-minilm-cpu-merged.json").read_text())["rows"][2]["average"] == 52.0


def test_a_task_no_file_ran_leaves_the_average_open(tmp_path):
    one = _table(tmp_path / "a.json", "cached", {"sst2": (85.0, 300.0, 20.0)})
    res = run_table_merge(_spec(tmp_path, [{"label": "LST", "method": "cached", "files": [one]}]), tmp_path,
                          write=False)
    assert res["rows"][0]["scores"] == {"sst2": 85.0, "cola": None} and res["rows"][0]["average"] is None


@pytest.mark.parametrize("rows,needle", [
    ([{"label": "x", "method": "full"}], "rows[0]: missing 'files'"),
    ([{"label": "x", "method": "full", "files": ["nope.json"]}], "nope.json not found"),
    ([{"label": "x", "method": "lora", "files": ["f.json"]}], "has no method 'lora'"),
    ([{"label": "x", "method": "full", "files": ["f.json"], "offset": "up"}], "'offset' must be two numbers"),
    ("not a list", "'rows' must be a non-empty list"),
])
def test_bad_specs_name_what_to_fix(tmp_path, rows, needle):
    _table(tmp_path / "f.json", "full", {"sst2": (86.0, 3000.0, 100.0)})
    with pytest.raises(UserError, match=None) as e:
        run_table_merge(_spec(tmp_path, rows), tmp_path, write=False)
    assert needle in str(e.value)


def test_the_committed_converged_spec_reads_its_files():
    """The README's merged table comes from this spec: every file it names is committed."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = load_spec(root / "benchmarks" / "tables" / "minilm-converged.yaml")
    res = run_table_merge(spec.source, root / "benchmarks" / "results", write=False)
    assert [r["label"] for r in res["rows"]] == [r.label for r in spec.rows]
    assert all(r["scores"]["sst2"] is not None for r in res["rows"])
    # the README's copy is the one these files give (`lst bench table-merge ... --readme README.md`)
    from pipeline.bench.table_merge import README_END, README_START, readme_block, render_markdown

    readme = (root / "README.md").read_text()
    carried = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert carried == readme_block(render_markdown(res)).strip()


def test_readme_markers_are_required_and_the_block_is_replaced(tmp_path):
    from pipeline.bench.table_merge import update_readme

    md = "# t\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- LST: full average -1.00\n\nSources:\n- x: `f.json`\n"
    r = tmp_path / "README.md"
    r.write_text("no markers\n")
    with pytest.raises(UserError, match="markers"):
        update_readme(r, md)
    r.write_text("top\n<!-- merged-table:start -->\nold\n<!-- merged-table:end -->\nbottom\n")
    assert update_readme(r, md) and not update_readme(r, md)
    assert r.read_text() == ("top\n<!-- merged-table:start -->\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                             "- LST: full average -1.00\n<!-- merged-table:end -->\nbottom\n")
