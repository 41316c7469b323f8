"""`python -m herd_trio status [--config FILE]`: ask every server's admin port, print a table.

Exit status 0 only if every server answers, is ready and has every link up; 1
otherwise; 2 for a bad command line or config. Command words (`status`) come before
server names on the command line: run a server that is named `status` with
`python -m herd_trio -- status` (the `--` ends the options and the command words).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from herd_trio import config
from herd_trio.config import ConfigError, HerdConfig
from herd_trio.view import admin_url

STATUS_DEADLINE = 3.0  # seconds to wait for each server's answers
COLUMNS = ("SERVER", "UP", "READY", "LINKS", "RECORDS", "CLIENTS", "DIGEST")


@attrs.frozen
class Report:
    """What one server said (or that it said nothing)."""

    name: str
    up: bool = False
    ready: bool = False
    links_up: int = 0
    links_total: int = 0
    records: int | None = None
    clients: int | None = None
    digest: str | None = None
    problem: str = ""


async def ask(client: httpx.AsyncClient, name: str, base: str, token: str | None) -> Report:
    """Server `name`'s /readyz?links=all and /state, as a Report; never raises."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with trio.fail_after(STATUS_DEADLINE):
            ready = await client.get(f"{base}/readyz?links=all", headers=headers)
            state = await client.get(f"{base}/state", headers=headers)
        state.raise_for_status()
        body: dict[str, Any] = ready.json()
        info: dict[str, Any] = state.json()
    except (httpx.HTTPError, trio.TooSlowError, ValueError) as exc:
        return Report(name, problem=str(exc) or type(exc).__name__)
    return Report(
        name,
        up=True,
        ready=ready.status_code == 200,
        links_up=int(body["links_up"]),
        links_total=int(body["links_total"]),
        records=int(info["records"]),
        clients=int(info["clients"]),
        digest=str(info["digest"]),
    )


async def gather(herd: HerdConfig, environ: Mapping[str, str]) -> list[Report]:
    """Ask every server with an admin port, all at once."""
    reports: dict[str, Report] = {}

    async def one(client: httpx.AsyncClient, name: str) -> None:
        cfg = herd.servers[name]
        assert cfg.admin_port is not None
        token = environ.get(cfg.admin_token_env) if cfg.admin_token_env else None
        reports[name] = await ask(client, name, admin_url(cfg.admin_host, cfg.admin_port), token)

    async with httpx.AsyncClient(trust_env=False) as client, trio.open_nursery() as nursery:
        for name, cfg in herd.servers.items():
            if cfg.admin_port is None:
                reports[name] = Report(name, problem="no admin_port configured")
            else:
                nursery.start_soon(one, client, name)
    return [reports[name] for name in herd.servers]


def table(reports: list[Report]) -> str:
    """The reports as aligned columns; DIGEST says whether the server agrees with most."""
    common = Counter(r.digest for r in reports if r.digest is not None).most_common(1)
    majority = common[0][0] if common else None
    rows = [COLUMNS]
    for r in reports:
        digest = "-" if r.digest is None else ("agrees" if r.digest == majority else "DIFFERS")
        rows.append(
            (
                r.name,
                "up" if r.up else "DOWN",
                "ready" if r.ready else "NO",
                f"{r.links_up}/{r.links_total}" if r.up else "-",
                "-" if r.records is None else str(r.records),
                "-" if r.clients is None else str(r.clients),
                f"{digest} {r.digest or ''}".strip(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines += [f"{r.name}: {r.problem}" for r in reports if r.problem]
    return "\n".join(lines)


def healthy(reports: list[Report]) -> bool:
    """Every server up, ready and fully linked (digests are shown, not judged: records in
    flight make them differ for a moment)."""
    return all(r.up and r.ready and r.links_up == r.links_total for r in reports)


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    """Run the status command; the exit status."""
    parser = argparse.ArgumentParser(prog="herd_trio status", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="herd config file (TOML); default: built in")
    args = parser.parse_args(argv)
    try:
        herd = config.load(args.config, environ=environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if "status" in herd.servers:
        print(
            "herd_trio: note: this is the status command; to run the server named 'status',"
            " use: python -m herd_trio -- status",
            file=sys.stderr,
        )
    reports = trio.run(gather, herd, environ)
    print(table(reports), flush=True)
    return 0 if healthy(reports) else 1
