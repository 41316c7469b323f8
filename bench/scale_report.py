"""The Markdown of a scale run (bench.scale): each figure beside its target and its value
before issue 11, and the marked section of docs/scale.md that a run replaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Result = dict[str, Any]

BEGIN = "<!-- scale: begin (written by `nox -s scale`; edits here are overwritten) -->"
END = "<!-- scale: end -->"


def _get(result: Result, *path: str) -> Any:  # noqa: ANN401 (JSON: any shape)
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _f(value: float | None, fmt: str = "{:,.0f}", unit: str = "") -> str:
    return "-" if value is None else fmt.format(value) + unit


def _latency(probe: Result | None) -> str:
    if not probe:
        return "-"
    p50, p99, top = probe["p50_ms"], probe["p99_ms"], probe["max_ms"]
    return f"{p50:.1f} / {p99:.1f} / {top:.0f} ms ({probe['n']:,} probes)"


def _pair(phase: Result, what: str) -> str:
    return f"{_f(phase.get(what + '_a_to_b'))} / {_f(phase.get(what + '_b_to_a'))}"


def _s(value: float | None, digits: int = 2) -> str:
    return _f(value, f"{{:.{digits}f}}", " s")


def rows(r: Result) -> list[tuple[str, str, str, str]]:
    """(figure, target, before issue 11, measured) for every figure of the run."""
    n, d = r["records"], r["missed_updates"]
    ing, rst = r.get("ingest", {}), r.get("restart", {})
    join, cu = r.get("join", {}), r.get("catch_up", {})
    agree = f"join {_yes(join.get('same_digest'))}, catch-up {_yes(cu.get('same_digest'))}"
    rss = f"{_f(ing.get('rss_bytes_per_record'))} B ({_f(ing.get('rss_mb'))} MB in all;"
    rss += f" {_f(ing.get('rss_growth_bytes_per_record'))} B per record of growth)"
    accept = _s(rst.get("accept_s")) + f" (empty state: {_s(join.get('b_accept_s'))})"
    size = _f(ing.get("state_file_mb"), "{:,.1f}", " MB")
    size += f" ({_f(ing.get('state_bytes_per_record'))} B/record)"
    quick = "p99 a few ms, max < 100 ms"
    return [
        (
            "ingest: records (4 connections, 64 IAMATs in flight each)",
            "-",
            "-",
            _f(ing.get("records")),
        ),
        ("ingest rate", "-", "-", _f(ing.get("rate"), "{:,.0f}", " IAMAT/s")),
        (
            "RSS per stored record, while ingesting (outboxes, persister queue, allocator)",
            "-",
            "475-550 B (505 MB at 1M)",
            rss,
        ),
        (
            "RSS per stored record, restarted and loaded: all / above an empty server",
            "<= 250 B at 1M",
            "475-550 B (505 MB at 1M)",
            _f(rst.get("loaded_rss_bytes_per_record"), "{:,.0f}", " B")
            + " / "
            + _f(rst.get("loaded_rss_growth_bytes_per_record"), "{:,.0f}", " B"),
        ),
        ("state file size", "-", "-", size),
        (
            "log bytes per update (A, client side)",
            "bounded (rotation)",
            "232 B, no rotation",
            _f(ing.get("log_bytes_per_update"), "{:,.0f}", " B"),
        ),
        ("restart: client port accepts", "<= 0.5 s", "7.8-9.0 s", accept),
        (
            f"restart: {rst.get('samples', 0):,} sampled clients answered right",
            "<= 3 s",
            "7.8-9.0 s (the port opened after the load)",
            _s(rst.get("all_answered_s")),
        ),
        ("restart: store loaded (/readyz ready)", "-", "7.8-9.0 s", _s(rst.get("ready_s"))),
        (
            "restart before issue 11, this run: imports, then the blocking load",
            "-",
            "7.8-9.0 s",
            _s(rst.get("blocking_load_s")),
        ),
        ("restart: peak RSS", "-", "733 MB", _f(rst.get("peak_rss_mb"), "{:,.0f}", " MB")),
        (
            "restart: A's IAMAT p50 / p99 / max while it loads",
            quick,
            "no answers at all",
            _latency(rst.get("probe_while_loading")),
        ),
        ("empty B joins A: complete after", "-", "26 s", _s(join.get("complete_s"), 1)),
        (
            "empty B joins A: B's state file holds it all, after the join",
            "-",
            "-",
            _s(join.get("b_state_written_s"), 1),
        ),
        (
            "empty B joins A: records sent A->B / B->A",
            f"about n = {n:,} / 0",
            "-",
            _pair(join, "records"),
        ),
        ("empty B joins A: bytes on the link A->B / B->A", "-", "-", _pair(join, "bytes")),
        (
            "empty B joins A: A's IAMAT p50 / p99 / max",
            quick,
            "max 1.7 s",
            _latency(join.get("probe_on_a")),
        ),
        (
            f"catch-up after d = {d:,} missed updates: B holds them after",
            "-",
            "40 s",
            _s(cu.get("complete_s"), 1),
        ),
        ("catch-up: B loaded its file (/readyz ready) after", "-", "-", _s(cu.get("b_ready_s"), 1)),
        (
            "catch-up: records sent A->B / B->A",
            f"grows with d ({d:,}), not n",
            f"~{n:,} each way",
            _pair(cu, "records"),
        ),
        (
            "catch-up: bytes on the link A->B / B->A",
            "grows with d, not n",
            "the whole store each way",
            _pair(cu, "bytes"),
        ),
        (
            "catch-up: A's IAMAT p50 / p99 / max",
            quick,
            "p99 104 ms, max 3.4 s",
            _latency(cu.get("probe_on_a")),
        ),
        ("stores agree afterwards (same /state digest)", "yes", "-", agree),
    ]


def _yes(value: object) -> str:
    return "yes" if value else "no"


def markdown(result: Result) -> str:
    """The section docs/scale.md shows for one run."""
    out = [
        f"### Measured: {result['records']:,} records, two servers on this machine",
        "",
        "`nox -s scale` (`python -m bench.scale --write-docs`; bench/scale.py) drives two real"
        " `python -m herd_trio` processes, A and B, linked, with `state_dir` and admin ports,"
        " and reads everything from outside: TCP, /state and /readyz, the files, and the"
        " kernel's byte counts of the link's socket (`ss -ti`). The probe is one connection"
        " sending the same IAMAT to A every 2 ms (a repeat after the first, so it does not"
        " keep the link busy) and timing each reply. The machine is shared"
        " (2 cores, other work running), so times vary from run to run; counts do not.",
        "",
        "| figure | target | before issue 11 | measured |",
        "|---|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(result)]
    out += ["", f"The whole session took {result.get('seconds', 0):.0f} s."]
    tables = _get(result, "simulation", "tables")
    if tables:
        out += [
            "",
            "Simulation summary (`python -m bench.sim --quick`, 50 and 200 servers):",
            "",
            tables,
        ]
    return "\n".join(out)


def write_docs(path: Path, section: str) -> None:
    """Replace the marked section of `path` with `section` (appended if not there yet)."""
    text = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Measured on this machine\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
