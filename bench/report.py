"""Turn results.json into the ratio table, the target verdicts, summary.md and an SVG plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any
from xml.sax.saxutils import escape

Result = dict[str, Any]
Row = tuple[str, str, str, str]  # figure, herd, limit, herd/limit


def _get(results: Result, *path: str | int) -> Any:  # noqa: ANN401 (JSON: any shape)
    """results[a][b]... or None where a step is missing."""
    here: Any = results
    for step in path:
        in_dict = isinstance(here, dict) and step in here
        in_list = isinstance(here, list) and isinstance(step, int) and step < len(here)
        if not (in_dict or in_list):
            return None
        here = here[step]
    return here


def _cell(results: Result, conns: int, depth: int) -> Result | None:
    for cell in results.get("throughput", []):
        if cell["conns"] == conns and cell["depth"] == depth:
            found: Result = cell
            return found
    return None


def _fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def _ratio(herd: float | None, limit: float | None) -> str:
    if herd is None or limit is None or limit == 0:
        return "n/a"
    return f"{herd / limit:.2f}x"


def ratio_rows(results: Result) -> list[Row]:
    """Every figure that has a limit-server counterpart, as herd, limit, ratio."""
    rows: list[Row] = []
    for cell in results.get("throughput", []):
        h, lim = cell["herd"]["rps"], cell["limit"]["rps"]
        rows.append(
            (
                f"throughput {cell['conns']} conn x {cell['depth']} (req/s)",
                _fmt(h),
                _fmt(lim),
                _ratio(h, lim),
            )
        )
    spread = _get(results, "spread", "rps")
    lim16 = _get(_cell(results, 100, 16) or {}, "limit", "rps")
    if spread is not None:
        rows.append(
            (
                "throughput 100x16 spread over 5 servers",
                _fmt(spread),
                _fmt(lim16),
                _ratio(spread, lim16),
            )
        )
    for depth in (16, 1):
        solo = _get(results, "solo", f"solo_100x{depth}", "rps")
        solo_limit = _get(results, "solo", f"limit_100x{depth}", "rps")
        if solo is not None:
            rows.append(
                (
                    f"throughput 100x{depth}, one server, no neighbours",
                    _fmt(solo),
                    _fmt(solo_limit),
                    _ratio(solo, solo_limit),
                )
            )
    for depth in (16, 1):
        cell = _cell(results, 100, depth)
        if cell:
            h, lim = cell["herd"]["entry_cpu_us_per_reply"], cell["limit"]["cpu_us_per_reply"]
            rows.append(
                (
                    f"CPU per reply, entry server, 100x{depth} (us)",
                    _fmt(h, "", 1),
                    _fmt(lim, "", 1),
                    _ratio(h, lim),
                )
            )
            h = cell["herd"]["cpu_us_per_reply"]
            rows.append(
                (
                    f"CPU per reply, all 5 servers, 100x{depth} (us)",
                    _fmt(h, "", 1),
                    _fmt(lim, "", 1),
                    _ratio(h, lim),
                )
            )
    for q in ("p50", "p99"):
        h = _get(results, "sequential", "herd", "latency", f"{q}_us")
        lim = _get(results, "sequential", "limit", "latency", f"{q}_us")
        rows.append((f"sequential IAMAT latency {q} (us)", _fmt(h), _fmt(lim), _ratio(h, lim)))
    h_cpu = _get(results, "sequential", "herd", "server_cpu_us_per_request")
    l_cpu = _get(results, "sequential", "limit", "server_cpu_us_per_request")
    if h_cpu and l_cpu:
        h, lim = sum(h_cpu.values()), sum(l_cpu.values())
        rows.append(
            (
                "sequential IAMAT, CPU per request, all servers (us)",
                _fmt(h),
                _fmt(lim),
                _ratio(h, lim),
            )
        )
    w_cpu = _get(results, "whatsat", "paris", "server_cpu_us_per_request")
    if w_cpu and l_cpu:
        h, lim = sum(w_cpu.values()), sum(l_cpu.values())
        rows.append(
            (
                "WHATSAT Paris, CPU per request vs limit IAMAT (us)",
                _fmt(h),
                _fmt(lim),
                _ratio(h, lim),
            )
        )
    for q in ("p50", "p99"):
        h = _get(results, "whatsat", "paris", "latency", f"{q}_us")
        lim = _get(results, "sequential", "limit", "latency", f"{q}_us")
        rows.append(
            (f"WHATSAT Paris 50 km/20 {q} vs limit IAMAT (us)", _fmt(h), _fmt(lim), _ratio(h, lim))
        )
    for step_h, step_l in zip(
        _get(results, "idle", "herd", "steps") or [],
        _get(results, "idle", "limit", "steps") or [],
        strict=False,
    ):
        h, lim = step_h.get("bytes_per_conn"), step_l.get("bytes_per_conn")
        rows.append(
            (
                f"memory per idle connection at {step_h['count']:,} (bytes)",
                _fmt(h),
                _fmt(lim),
                _ratio(h, lim),
            )
        )
    h, lim = _get(results, "launch", "herd", "p50_s"), _get(results, "launch", "limit", "p50_s")
    rows.append(
        (
            "launch to accepting, p50 (ms)",
            _fmt(_ms(h), "", 0),
            _fmt(_ms(lim), "", 0),
            _ratio(h, lim),
        )
    )
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


Target = tuple[str, str, str, bool | None]  # target, measured, threshold, verdict


def targets(results: Result) -> list[Target]:
    """The issue's targets with PASS (True), FAIL (False) or not measured (None)."""
    out: list[Target] = []

    def check(name: str, value: float | None, shown: str, limit: float, op: str) -> None:
        verdict = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append(
            (name, shown if value is not None else "not measured", f"{op} {limit:g}", verdict)
        )

    def ratio_of(conns: int, depth: int) -> float | None:
        cell = _cell(results, conns, depth)
        return None if cell is None else float(cell["ratio"])

    r = ratio_of(100, 16)
    check("throughput 100 conn x 16, herd flooding / limit", r, f"{r or 0:.2f}x", 0.4, ">=")
    r = ratio_of(100, 1)
    check("throughput 100 conn unpipelined / limit", r, f"{r or 0:.2f}x", 0.5, ">=")
    r = _get(results, "sequential", "p50_ratio")
    check("sequential latency p50 / limit", r, f"{r or 0:.2f}x", 1.5, "<=")
    observed = _get(results, "propagation", "chain_observed") is not None
    method = "chain_observed" if observed else "chain"
    for q, limit_ms in (("p50", 0.5), ("p99", 2.0)):
        hop2 = _get(results, "propagation", method, "by_hops", "2", 0, "latency", f"{q}_us")
        ms = None if hop2 is None else hop2 / 1000
        how = "observer peer" if observed else "WHATSAT polls"
        check(f"propagation 2 hops {q} (ms, chain, {how})", ms, f"{ms or 0:.3f} ms", limit_ms, "<=")
    per_edge = _get(results, "messages_quiet", "default", "msg", "per_edge")
    check("AT lines per update per edge, quiet", per_edge, f"{per_edge or 0:.2f}", 2, "<=")
    loaded = [
        v
        for k, v in (_get(results, "messages", "default") or {}).items()
        if k.startswith("tph") and isinstance(v, dict)
    ]
    servers = _get(results, "messages", "default", "servers") or 5
    if loaded and any(v["per_update"] < servers - 1 for v in loaded):
        # Fewer lines than a spanning tree needs: the flood did not reach every server.
        out.append(
            (
                "AT lines per update per edge, under 100x16 load",
                "incomplete: " + ", ".join(f"{v['per_update']:.2f}/update" for v in loaded),
                f">= {servers - 1}/update",
                False,
            )
        )
    else:
        worst = max(v["per_edge"] for v in loaded) if loaded else None
        check(
            "AT lines per update per edge, under 100x16 load", worst, f"{worst or 0:.2f}", 2, "<="
        )
    waits = _get(results, "converge", "seconds")
    if waits:
        slowest_s = None if None in waits.values() else max(waits.values())
        shown = (
            f"{slowest_s:.2f} s"
            if slowest_s is not None
            else f"not within {_get(results, 'converge', 'limit_s'):.0f} s"
        )
        out.append(
            (
                "(not an issue target) last 100x16 update at every server after the load",
                shown,
                "-",
                slowest_s is not None,
            )
        )
    herd_steps = _get(results, "idle", "herd", "steps") or []
    limit_steps = _get(results, "idle", "limit", "steps") or []
    for step_h, step_l in zip(herd_steps, limit_steps, strict=False):
        h, lim = step_h.get("bytes_per_conn"), step_l.get("bytes_per_conn")
        r = None if h is None or not lim else h / lim
        check(
            f"idle memory per connection at {step_h['count']:,} / limit",
            r,
            f"{r or 0:.2f}x",
            1.3,
            "<=",
        )
    big = next((s for s in herd_steps if s["count"] == 10000), None)
    accepted = None if big is None else big.get("accepted", 0) * (1 if big.get("responsive") else 0)
    check(
        "idle clients accepted (and still answering)", accepted, f"{accepted or 0:,}", 10000, ">="
    )
    p50 = _get(results, "launch", "herd", "p50_s")
    check("launch to accepting p50 (s)", p50, f"{p50 or 0:.3f} s", 0.3, "<=")
    slowest = _get(results, "launch", "herd", "max_s")
    check(
        "launch to accepting max (s, PROTOCOL.md 0.5 s)",
        slowest,
        f"{slowest or 0:.3f} s",
        0.5,
        "<=",
    )
    p99 = _get(results, "whatsat", "paris", "latency", "p99_us")
    ms = None if p99 is None else p99 / 1000
    check("WHATSAT offline Paris 50 km/20 p99 (ms)", ms, f"{ms or 0:.3f} ms", 2.0, "<=")
    elapsed = _get(results, "meta", "elapsed_s")
    check("suite run time (s)", elapsed, f"{elapsed or 0:.0f} s", 600, "<=")
    return out


def _verdict(v: bool | None) -> str:
    return "n/a" if v is None else ("PASS" if v else "FAIL")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def noise(results: Result) -> str | None:
    """A warning when other processes kept the machine busy during the run."""
    start = _get(results, "meta", "foreign_cores_at_start") or 0.0
    runs = [
        c[k].get("foreign_cores", 0.0)
        for c in results.get("throughput", [])
        for k in ("limit", "herd")
    ]
    during = sum(runs) / len(runs) if runs else 0.0
    if max(start, during) < 0.3:
        return None
    return (
        f"WARNING: other processes kept {start:.2f} cores busy at the start and {during:.2f} on"
        " average during the throughput runs (of 2): latency figures and the herd (6"
        " processes) suffer more than the limit server (2); compare CPU per reply instead."
    )


def text_table(results: Result) -> str:
    """The ratio table and the target verdicts, for the terminal."""
    rows = ratio_rows(results)
    width = max(len(r[0]) for r in rows)
    out = [f"{'figure':<{width}}  {'herd':>12}  {'limit':>12}  {'ratio':>7}"]
    out += [f"{a:<{width}}  {b:>12}  {c:>12}  {d:>7}" for a, b, c, d in rows]
    out.append("")
    tg = targets(results)
    width = max(len(t[0]) for t in tg)
    out.append(f"{'target':<{width}}  {'measured':>12}  {'needs':>8}  verdict")
    out += [f"{n:<{width}}  {m:>12}  {t:>8}  {_verdict(v)}" for n, m, t, v in tg]
    if warning := noise(results):
        out += ["", warning]
    return "\n".join(out)


def markdown(results: Result) -> str:
    """summary.md: machine, targets, ratios, and the detail tables."""
    meta = results["meta"]
    lines = [
        "# herd_trio benchmark summary",
        "",
        f"{meta['nproc']} x {meta['cpu_model']}, Python {meta['python']}, trio {meta['trio']}, "
        f"commit {meta['commit']} ({meta['herd_trio_uncommitted_files']} uncommitted files "
        f"under herd_trio/), {'quick' if meta['quick'] else 'full'} run, "
        f"{meta.get('elapsed_s', 0):.0f} s, herd settings {meta.get('settings', {})}, "
        f"nice {meta.get('nice', 0)}. Load average at start: "
        + ", ".join(f"{x:.2f}" for x in meta["load_average_at_start"])
        + ".",
        "",
        "## Targets",
        "",
    ]
    if warning := noise(results):
        lines[-2:-2] = [warning, ""]
    lines += _table(
        ("target", "measured", "needs", "verdict"),
        [(n, m, t, _verdict(v)) for n, m, t, v in targets(results)],
    )
    lines += ["", "## Herd vs limit server", ""]
    lines += _table(("figure", "herd", "limit", "herd/limit"), ratio_rows(results))
    lines += ["", "## Throughput detail", ""]
    detail = []
    for cell in results.get("throughput", []):
        for kind in ("limit", "herd"):
            run = cell[kind]
            lat = run["batch_latency"]
            detail.append(
                (
                    f"{cell['conns']}x{cell['depth']}",
                    kind,
                    _fmt(run["rps"]),
                    " / ".join(_fmt(x) for x in run["all_rps"]),
                    _fmt(lat.get("p50_us"), "", 0),
                    _fmt(lat.get("p99_us"), "", 0),
                    _fmt(run["cpu_us_per_reply"], "", 1),
                    f"{run['loadgen_cpu_share']:.0%}",
                    f"{run.get('foreign_cores', 0):.2f}",
                    str(run["errors"]),
                )
            )
    lines += _table(
        (
            "cell",
            "server",
            "req/s (best)",
            "all runs",
            "batch p50 us",
            "batch p99 us",
            "server CPU us/reply",
            "loadgen CPU",
            "other users' cores",
            "errors",
        ),
        detail,
    )
    lines += [
        "",
        "## Propagation (IAMAT sent -> AT line from the server at the observer peer, or"
        " -> first WHATSAT answer from it)",
        "",
    ]
    prop = []
    labels = {
        "chain_observed": "chain, observer peer",
        "chain": "chain, WHATSAT polls",
        "default": "default, WHATSAT polls",
    }
    for herd_name, label in labels.items():
        by_hops = _get(results, "propagation", herd_name, "by_hops") or {}
        for hops, entries in sorted(by_hops.items()):
            for e in entries:
                lower = e.get("lower_bound", {}).get("p50_us")
                polls = e.get("polls_per_trial")
                prop.append(
                    (
                        label,
                        hops,
                        e["server"],
                        _fmt(e["latency"].get("p50_us")),
                        _fmt(e["latency"].get("p99_us")),
                        "-" if lower is None else _fmt(lower),
                        "-" if polls is None else f"{polls:.1f}",
                        str(e["lost"]),
                    )
                )
    lines += _table(
        ("herd", "hops", "server", "p50 us", "p99 us", "p50 us (poll sent)", "polls/trial", "lost"),
        prop,
    )
    lines += ["", "## Messages per update (AT lines received on peer links)", ""]
    msg = []
    tables = [("right after", results.get("messages_quiet") or {})]
    tables.append(("whole run", results.get("messages") or {}))
    for when, table in tables:
        for herd_name, figures in table.items():
            for prefix, f in figures.items():
                if isinstance(f, dict):
                    msg.append(
                        (
                            herd_name,
                            f"{prefix} ({when})",
                            str(f["updates"]),
                            str(f["peer_lines"]),
                            f"{f['per_update']:.2f}",
                            f"{f['per_edge']:.2f}",
                            str(figures["flood_minimum"]),
                            str(figures["edges"]),
                        )
                    )
    lines += _table(
        (
            "herd",
            "phase",
            "updates",
            "peer AT lines",
            "per update",
            "per edge",
            "one send per server",
            "edges",
        ),
        msg,
    )
    lines += ["", "## Other figures", ""]
    other = [
        (
            "places index ready after launch (s)",
            _fmt(_get(results, "launch", "places_ready_s"), "", 2),
        ),
        (
            "herd of 5 started, places loaded, all links carrying (s)",
            _fmt(_get(results, "herd_ready_s"), "", 2),
        ),
        (
            "launch to accepting, herd server, all (ms)",
            ", ".join(f"{x * 1000:.0f}" for x in _get(results, "launch", "herd", "accept_s") or []),
        ),
        (
            "launch to first reply, herd server, all (ms)",
            ", ".join(
                f"{x * 1000:.0f}" for x in _get(results, "launch", "herd", "first_reply_s") or []
            ),
        ),
        (
            "WHATSAT dense mix p50 / p99 (us)",
            f"{_fmt(_get(results, 'whatsat', 'dense_mix', 'latency', 'p50_us'))} / "
            f"{_fmt(_get(results, 'whatsat', 'dense_mix', 'latency', 'p99_us'))}",
        ),
        (
            "link drops before shutdown (default herd / chain)",
            " / ".join(
                str(len(v) if isinstance(v, list) else v)
                for v in (results.get("link_drops") or {}).values()
            ),
        ),
        (
            "anti-entropy: syncs that resent records, records resent (default herd)",
            str(_get(results, "sync_resends", "default")),
        ),
        (
            "other users' load at start (cores busy, of 2)",
            _fmt(_get(results, "meta", "foreign_cores_at_start"), "", 2),
        ),
        ("exit codes after SIGTERM", str(results.get("exit_codes"))),
        (
            "waits for idle servers that timed out (of all waits), longest wait (s)",
            f"{_get(results, 'settle', 'never_idle')} of {_get(results, 'settle', 'waits')}, "
            f"{_fmt(_get(results, 'settle', 'longest_s'), '', 1)}",
        ),
        ("skipped", ", ".join(results.get("skipped", [])) or "nothing"),
        ("phase errors", escape("; ".join(results.get("errors", [])) or "none")),
    ]
    lines += _table(("figure", "value"), other)
    micro = results.get("micro") or {}
    if micro:
        lines += ["", "## Per-call CPU cost of hot functions (bench.micro)", ""]
        lines += _table(
            ("function", "CPU us per call"),
            [
                (escape(k), f"{v:,.2f}" if isinstance(v, float) else escape(str(v)))
                for k, v in micro.items()
            ],
        )
    lines += profile_markdown(results.get("profile") or {})
    lines += ["", "![latency vs load](latency.svg)", ""]
    return "\n".join(lines)


def profile_markdown(profile: Result) -> list[str]:
    """The py-spy tables (self and inclusive shares) of Clark and Bona."""
    lines: list[str] = []
    if "skipped" in profile:  # no profile at all (py-spy missing)
        return ["", f"Profile: {profile['skipped']}"]
    for name in ("Clark", "Bona"):
        prof = profile.get(name)
        if not prof:
            continue
        if "self" not in prof:
            lines += ["", f"Profile of {name}: {prof.get('skipped')}"]
            continue
        lines += [
            "",
            f"## Profile of {name} under 100 x 16 at Clark ({prof['samples']} py-spy --gil"
            " samples)",
            "",
        ]
        lines += _table(("self %", "function"), [(f"{p:.1f}", escape(f)) for f, p in prof["self"]])
        lines += [""]
        lines += _table(
            ("inclusive %", "function"),
            [(f"{p:.1f}", escape(f)) for f, p in prof["inclusive"] if p < 95],
        )
    return lines


# ---- the plot: a hand-written SVG, no plotting dependency ----

COLOURS = {"herd": "#d9534f", "limit": "#337ab7"}


def svg(results: Result) -> str:
    """Three panels: throughput per cell, batch latency vs connections (depth 1 and 16)."""
    cells = results.get("throughput", [])
    w, h, pad = 1080, 380, 60
    panel_w = (w - 4 * pad) / 3
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
    ]
    top, bottom = 40.0, h - 50.0

    # Panel 1: throughput bars.
    x0 = float(pad)
    parts.append(_text(x0 + panel_w / 2, 20, "throughput (req/s), limit vs herd", 13, "middle"))
    top_rps = max([c[k]["rps"] for c in cells for k in ("limit", "herd")] or [1.0])
    ymax = _nice(top_rps)
    parts += _axis_linear(x0, panel_w, top, bottom, ymax)
    slot = panel_w / max(1, len(cells))
    for i, cell in enumerate(cells):
        for j, kind in enumerate(("limit", "herd")):
            value = cell[kind]["rps"]
            bh = (bottom - top) * value / ymax
            bx = x0 + i * slot + slot * (0.15 + 0.35 * j)
            parts.append(
                f'<rect x="{bx:.1f}" y="{bottom - bh:.1f}" width="{slot * 0.33:.1f}" '
                f'height="{bh:.1f}" fill="{COLOURS[kind]}"/>'
            )
        parts.append(
            _text(
                x0 + (i + 0.5) * slot, bottom + 14, f"{cell['conns']}x{cell['depth']}", 10, "middle"
            )
        )
        parts.append(
            _text(x0 + (i + 0.5) * slot, bottom + 26, f"{cell['ratio']:.2f}x", 10, "middle")
        )

    # Panels 2 and 3: batch latency vs connections, log-log.
    for p, depth in enumerate((1, 16)):
        x0 = pad + (p + 1) * (panel_w + pad)
        parts.append(
            _text(x0 + panel_w / 2, 20, f"latency vs load, {depth} pipelined (ms)", 13, "middle")
        )
        mine = [c for c in cells if c["depth"] == depth]
        values = [
            c[k]["batch_latency"].get(q, 0) / 1000
            for c in mine
            for k in ("limit", "herd")
            for q in ("p50_us", "p99_us")
        ]
        values = [v for v in values if v > 0]
        if not values:
            continue
        lo = float(10 ** math.floor(math.log10(min(values))))
        hi = float(10 ** math.ceil(math.log10(max(values))))
        conns = sorted({c["conns"] for c in mine})
        cx0, cx1 = math.log10(conns[0]), math.log10(conns[-1]) if len(conns) > 1 else 1.0

        def px(n: float, x0: float = x0, cx0: float = cx0, cx1: float = cx1) -> float:
            return x0 + panel_w * (math.log10(n) - cx0) / max(1e-9, cx1 - cx0)

        def py(v: float, lo: float = lo, hi: float = hi) -> float:
            return bottom - (bottom - top) * (math.log10(v) - math.log10(lo)) / (
                math.log10(hi) - math.log10(lo)
            )

        parts += _axis_log(x0, panel_w, top, bottom, lo, hi, py)
        for n in conns:
            parts.append(_text(px(n), bottom + 14, f"{n} conn", 10, "middle"))
        for kind in ("limit", "herd"):
            for q, dash in (("p50_us", ""), ("p99_us", ' stroke-dasharray="5,3"')):
                pts = [
                    (px(c["conns"]), py(max(lo, c[kind]["batch_latency"].get(q, lo * 1000) / 1000)))
                    for c in mine
                ]
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                parts.append(
                    f'<polyline points="{path}" fill="none" stroke="{COLOURS[kind]}" '
                    f'stroke-width="2"{dash}/>'
                )
                parts += [
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{COLOURS[kind]}"/>'
                    for x, y in pts
                ]
    # Legend.
    lx = float(pad)
    for kind in ("limit", "herd"):
        parts.append(f'<rect x="{lx}" y="{h - 18}" width="12" height="12" fill="{COLOURS[kind]}"/>')
        parts.append(_text(lx + 16, h - 8, f"{kind} server", 11, "start"))
        lx += 110
    parts.append(
        _text(
            lx,
            h - 8,
            "solid: p50, dashed: p99 of the time to answer one "
            "batch (depth lines); ratio under each bar pair: herd/limit",
            11,
            "start",
        )
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _text(x: float, y: float, text: str, size: int, anchor: str) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}">'
        f"{escape(text)}</text>"
    )


def _nice(value: float) -> float:
    """A round number at or above `value` for an axis top."""
    power = float(10 ** math.floor(math.log10(max(value, 1e-9))))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _axis_linear(x0: float, width: float, top: float, bottom: float, ymax: float) -> list[str]:
    out = [
        f'<line x1="{x0}" y1="{bottom}" x2="{x0 + width}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="black"/>',
    ]
    for k in range(6):
        v = ymax * k / 5
        y = bottom - (bottom - top) * k / 5
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(x0 - 4, y + 4, f"{v / 1000:g}k", 10, "end"))
    return out


def _axis_log(
    x0: float,
    width: float,
    top: float,
    bottom: float,
    lo: float,
    hi: float,
    py: Callable[[float], float],
) -> list[str]:
    out = [
        f'<line x1="{x0}" y1="{bottom}" x2="{x0 + width}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="black"/>',
    ]
    v = lo
    while v <= hi * 1.0001:
        y = py(v)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(x0 - 4, y + 4, f"{v:g}", 10, "end"))
        v *= 10
    return out
