"""The limit server: the least a trio server can do to answer IAMAT, as a baseline.

    python -m bench.limit PORT

It frames lines, parses an IAMAT, computes the time difference in integer nanoseconds
and writes the AT reply: one task per connection, one `send_all` per batch of lines
that arrived together (as herd_trio does), nothing else. No store, no flooding, no log,
no validation beyond the field count. Every herd figure is reported as a ratio to it.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import trio

NAME = b"Limit"


def reply(line: bytes, now_ns: int) -> bytes:
    """The AT reply to an IAMAT line, or `? line` for anything else."""
    fields = line.split()
    if len(fields) != 4 or fields[0] != b"IAMAT":
        return b"? " + line + b"\n"
    whole, _, frac = fields[3].partition(b".")
    skew = now_ns - (int(whole) * 1_000_000_000 + int(frac[:9].ljust(9, b"0")))
    sign = b"-" if skew < 0 else b"+"
    seconds, ns = divmod(abs(skew), 1_000_000_000)
    return b"AT %s %s%d.%09d %s %s %s\n" % (
        NAME,
        sign,
        seconds,
        ns,
        fields[1],
        fields[2],
        fields[3],
    )


async def handle(stream: trio.SocketStream) -> None:
    """Answer every complete line; all lines of one receive get one write."""
    pending = b""
    try:
        async for data in stream:
            pending += data
            *lines, pending = pending.split(b"\n")
            if lines:
                now_ns = time.time_ns()
                await stream.send_all(b"".join([reply(ln.rstrip(b"\r"), now_ns) for ln in lines]))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; serve_tcp closes the stream


def main() -> None:
    """Serve on 127.0.0.1:PORT until killed."""
    port = int(sys.argv[1])
    trio.run(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))


if __name__ == "__main__":
    main()
