"""The scale session's harness (bench/scale.py) at a tiny size, so that it cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.scale_report import BEGIN, END, markdown, write_docs

ROOT = Path(__file__).resolve().parent.parent


def test_the_harness_runs_end_to_end_at_2000_records(tmp_path: Path) -> None:
    argv = ["--records", "2000", "--missed", "200", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    ingest, restart = result["ingest"], result["restart"]
    assert ingest["records"] >= 2000
    assert ingest["errors"] == 0
    assert ingest["rss_bytes_per_record"] > 0
    assert ingest["state_bytes_per_record"] > 0
    assert ingest["log_bytes_per_update"] > 0
    assert restart["samples"] > 0
    assert 0 < restart["accept_s"] <= restart["all_answered_s"]
    assert restart["blocking_load_s"] > 0
    for phase in ("join", "catch_up"):
        sync = result[phase]
        assert sync["same_digest"], sync
        assert sync["probe_on_a"]["n"] > 0
        assert sync["probe_on_a"]["errors"] == 0
        if shutil.which("ss") is not None:  # the link's byte counts come from iproute2
            assert sync["bytes_a_to_b"] > 0
    assert result["join"]["records_a_to_b"] >= ingest["records"]
    assert result["catch_up"]["records_a_to_b"] >= 200  # at least the missed updates
    assert "| ring | 50 |" in result["simulation"]["tables"]
    table = (tmp_path / "scale.md").read_text()
    assert "| figure | target | before issue 11 | measured |" in table


def test_a_rerun_replaces_the_marked_section_of_the_docs(tmp_path: Path) -> None:
    page = tmp_path / "scale.md"
    page.write_text("# Scale\n\nText before.\n")
    first = markdown({"records": 10, "missed_updates": 2, "seconds": 1.0})
    write_docs(page, first)
    write_docs(page, first.replace("took 1 s", "took 2 s"))
    text = page.read_text()
    assert text.count(BEGIN) == 1
    assert text.count(END) == 1
    assert "took 2 s" in text
    assert "took 1 s" not in text
    assert text.startswith("# Scale\n\nText before.\n")
