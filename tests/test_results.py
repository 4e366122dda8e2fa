"""Published figures are traceable: every committed results file records where it came from, and the
README's result tables are exactly what their results files say (benchmarks/tables.py)."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_every_results_file_records_commit_date_machine_and_command():
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for f in files:
        data = json.loads(f.read_text())
        assert isinstance(data, dict) and "rows" in data, f"{f.name}: no provenance wrapper"
        p = data["provenance"]
        assert p["commit"] and p["date"] and p["command"], f.name
        assert p["machine"].get("cores") or p["machine"].get("gpu"), f.name


def test_readme_tables_are_their_results_files():
    import tables

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    names = [m["name"] for m in tables.MARK.finditer(text)]
    assert {"spec_decode_cpu_small_pair", "train_throughput_cpu_tiny", "pipeline_tiny", "test_tiers_cpu"} <= set(names)
    assert tables.check(text) == []
    # and the check can fail: a changed figure is caught
    name = "train_throughput_cpu_tiny"
    body = tables.render(name)
    changed = text.replace(body, body.replace("| 1 |", "| 3 |", 1))
    assert changed != text and tables.check(changed) == [name]
