"""Addresses and sends shared by the client and peer sides: who is at the other end,
is it on this host, a send that gives up after a deadline, and a close that does not
destroy replies the other end has not read yet."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat

import trio

LINGER = 2.0  # seconds a closing connection's input is drained at most (Apache's value)
LINGER_BYTES = 4 << 20  # bytes drained at most: a few ms of CPU, then the close is abrupt
LINGER_CHUNK = 65536
# Errors a connection that is being closed anyway may raise: it is closed regardless.
CLOSE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def hostport(host: str, port: int) -> str:
    """`host:port` for the log, an IPv6 address in brackets: `[::1]:12000` (RFC 3986)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(stream: trio.abc.Stream) -> str:
    """`host:port` of the remote end, for the log (the stream's type if it has no socket)."""
    if isinstance(stream, trio.SocketStream):
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return "?"
        return hostport(host, port)
    return type(stream).__name__


def host_of(who: str) -> str:
    """The host part of a `describe()` string (`::1` of `[::1]:4000`, `10.0.0.1` of
    `10.0.0.1:4000`)."""
    host = who.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback_host(host: str) -> bool:
    """True if `host` is an address of this host (127.0.0.0/8, ::1, v4-mapped loopback)."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback(stream: trio.abc.Stream) -> bool:
    """True if the remote end of `stream` is on this host."""
    if not isinstance(stream, trio.SocketStream):
        return False
    try:
        host = stream.socket.getpeername()[0]
    except (OSError, IndexError):
        return False
    return isinstance(host, str) and is_loopback_host(host)


async def send_within(
    stream: trio.abc.SendStream, data: bytes, deadline: float, *, then_yield: bool = True
) -> None:
    """`send_all(data)`, or trio.TooSlowError if the other end has not taken it in time.

    A client or peer that stops reading must not pin a task or its buffers forever.
    On a plain socket, what the kernel takes at once is written straight away, and only
    a rest (a full socket buffer) is sent under the deadline: entering and leaving a
    cancel scope with a deadline costs about as much as the send itself. The caller is
    the stream's only writer.

    Like send_all, it is a checkpoint, also when the kernel took everything at once.
    That yield is worth its cost: a client that waits for each reply before its next
    line (telnet, or 100 such clients) has that line on its way while the other tasks
    run, so the next receive usually reads it at once instead of finding the socket
    empty and waiting for it to become readable (an empty read, an epoll_ctl, and a
    sleep that an idle core is slow to wake from). Measured on Clark alone, 100 x 1:
    about 30% less server CPU per request and 1.4x the replies/s (docs/performance.md).
    `then_yield=False` leaves that yield to a caller that must first update what other
    tasks see of the send (a link writer, whose loop checkpoints next).
    """
    if isinstance(stream, trio.SocketStream):
        data = send_now(stream, data)
        if not data:
            if then_yield:
                await trio.lowlevel.checkpoint()
            return
    with trio.move_on_after(deadline) as scope:
        await stream.send_all(data)
    if scope.cancelled_caught:
        raise trio.TooSlowError


def send_now(stream: trio.SocketStream, data: bytes) -> bytes:
    """Write what the socket takes without waiting; the rest (b"" if all went).

    Errors as trio's send_all raises them: ClosedResourceError once the stream is
    closed, BrokenResourceError when the connection is gone.
    """
    try:
        sent = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        return data
    except OSError as exc:
        raise _stream_error(stream, exc) from exc
    return data[sent:]


def _stream_error(
    stream: trio.SocketStream, exc: OSError
) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """What trio's stream raises for `exc` from a read or write of its socket:
    ClosedResourceError once the stream is closed, else BrokenResourceError."""
    if exc.errno == errno.EBADF or stream.socket.fileno() < 0:
        return trio.ClosedResourceError("this stream was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | bytearray:
    """`stream.receive_some(max_bytes)`, with its checkpoints and errors.

    On a plain socket, read(2) takes what is there, as trio's socket does, without the
    wrappers and context managers it enters for every receive (the caller is the
    stream's only reader): a checkpoint if cancelled, a read, and a yield when it got
    something; else waits until the socket is readable and reads again.
    """
    if not isinstance(stream, trio.SocketStream):
        return await stream.receive_some(max_bytes)
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        data = _read(stream, max_bytes)
    except BlockingIOError:
        pass
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data
    while True:
        await trio.lowlevel.wait_readable(stream.socket)
        try:
            return _read(stream, max_bytes)
        except BlockingIOError:
            pass


def _read(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """One read(2); BlockingIOError if nothing is there, and the errors of trio's
    receive_some otherwise (_stream_error)."""
    try:
        return os.read(stream.socket.fileno(), max_bytes)
    except BlockingIOError:
        raise
    except OSError as exc:
        raise _stream_error(stream, exc) from exc


async def linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read and discard the other end's input until its EOF, for at
    most LINGER seconds and LINGER_BYTES bytes; the caller closes the stream after.

    Closing a TCP socket that still holds unread input makes the kernel send RST
    instead of FIN, and an RST makes the other end's kernel throw away replies it has
    received but the application has not read yet (the reply to an IAMAT
    sent just before an over-long line was lost). Draining first, as Apache's
    lingering close does, lets everything already sent arrive. Not for `finally`:
    it is cancellable, so a server that stops does not wait for it.
    """
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        await trio.lowlevel.checkpoint()
        return  # without a half-close the other end would not know to stop sending
    drained = 0
    with trio.move_on_after(LINGER):
        try:
            await stream.send_eof()
            while drained < LINGER_BYTES:
                if not (data := await stream.receive_some(LINGER_CHUNK)):
                    break
                drained += len(data)
        except CLOSE_ERRORS:
            pass  # the other end is gone already: nothing left to protect


def shut_connections(port: int, peer: tuple[str, int] | None = None) -> int:
    """Shut down, both ways, this process's TCP connections on local `port` (only the one
    from `peer`, if given); how many. Linux only (it reads /proc/self/fd); 0 elsewhere.

    For connections owned by a library that gives no handle on its sockets and may wait
    on a send with no deadline (hypercorn shields its writes): a shut-down socket makes
    that send fail at once, so the owner closes it. Listeners are left alone.
    """
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    count = 0
    for name in descriptors:
        if (sock := socket_of(name)) is None:
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                local, remote = sock.getsockname(), sock.getpeername()
            except OSError:
                continue  # a listener, or not connected
            if local[1] != port or (peer is not None and tuple(remote[:2]) != tuple(peer)):
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue
            count += 1
    return count


def socket_of(fd_name: str) -> socket.socket | None:
    """A socket object on a duplicate of descriptor `fd_name`, or None if it is not one."""
    try:
        fd = int(fd_name)
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        duplicate = os.dup(fd)  # our own handle: closing it leaves the owner's open
    except (OSError, ValueError):
        return None  # closed since the listing
    try:
        return socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return None
