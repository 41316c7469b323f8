"""Exception groups, flattened: what actually went wrong inside nested nurseries."""

from __future__ import annotations

from collections.abc import Iterator


def leaves(group: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, in order; a bare one is its own leaf.

    Nested nurseries nest groups (a port in use reaches `trio.run` as
    `ExceptionGroup([ExceptionGroup([OSError])])`), and `except*` hands over the group.
    """
    if isinstance(group, BaseExceptionGroup):
        for exc in group.exceptions:
            yield from leaves(exc)
    else:
        yield group
