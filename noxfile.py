"""Developer tasks: `nox` runs lint, typecheck and tests; `nox -s bench` benchmarks;
`nox -s scale` measures a million clients (a few minutes; not in the default run)."""

from __future__ import annotations

import logging
from pathlib import Path

import nox

PYPROJECT = nox.project.load_toml("pyproject.toml")
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"
# Plain venv + pip, on purpose (the README's commands need nothing else). nox still probes
# for uv before every session, whatever the backend, and logs "uv binary not found." each
# time (checked on nox 2026.10.20): drop that one line, it says nothing about this project.
nox.options.default_venv_backend = "venv"
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")

# ASYNC127 asks for httpx2 instead of httpx; httpx is this project's chosen HTTP client.
# ASYNC9xx (every async function must checkpoint on every path) are flake8-async's
# opt-in rules, off by default; naming --disable replaces that default, so list them.
# Our fast paths return without a checkpoint on purpose (a refused connection) and
# the callers checkpoint.
FLAKE8_ASYNC_DISABLE = "ASYNC9,ASYNC127"
# Startable functions whose names flake8-async (ASYNC114) should accept.
STARTABLE = "serve,run"


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property and end-to-end tests (real server processes on 127.0.0.1)."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "-m", "not slow and not hosts", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """The long fault-injection scenarios (partitions, pauses, restarts)."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def hosts(session: nox.Session) -> None:
    """The multi-host scenarios: five network namespaces, as root (skip or, in CI, fail
    without root, ip and nft)."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "-m", "hosts", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (style, bugs, ASYNC rules) and flake8-async (the ASYNC rules ruff lacks)."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # flake8-async wants file names, not folders.
    files = sorted(str(p) for d in ("herd_trio", "tests", "bench") for p in Path(d).rglob("*.py"))
    session.run(
        "flake8-async",
        f"--disable={FLAKE8_ASYNC_DISABLE}",
        f"--startable-in-context-manager={STARTABLE}",
        *files,
        "noxfile.py",
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the tests."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against a minimal trio server measured in the same run."""
    groups = nox.project.dependency_groups(PYPROJECT, "test", "bench")
    session.install("-e", ".", *groups)
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def scale(session: nox.Session) -> None:
    """A million records on two real servers: ingest, restart, join, catch-up; docs/scale.md."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("python", "-m", "bench.scale", "--write-docs", *session.posargs)
