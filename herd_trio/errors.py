"""PLACEHOLDER (replaced by the config branch)."""

from __future__ import annotations

from collections.abc import Iterator


def leaves(group: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(group, BaseExceptionGroup):
        for exc in group.exceptions:
            yield from leaves(exc)
    else:
        yield group
