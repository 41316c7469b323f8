"""The lab itself: namespaces reach one another only by their own addresses, and the
faults it makes (nft loss, cuts) do what they say. Checked before any scenario uses them."""

from __future__ import annotations

import socket

import trio

from tests.hosts.lab import SUBNET4, inside, lab, open_stream, sh

SO_RCVBUFFORCE = 33  # Linux <asm-generic/socket.h>; the socket module lacks the name


async def reaches(ns: str, host: str, port: int) -> bool:
    with trio.move_on_after(1.0):
        try:
            stream = await open_stream(ns, host, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


async def test_hosts_reach_each_other_and_cuts_stop_it() -> None:
    with lab(2) as made:
        server = sh(*made.exec(2, "true"))
        assert server.returncode == 0
        with inside(made.ns(2)):
            listener = trio.socket.socket()
        await listener.bind((f"{SUBNET4}.2", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert await reaches(made.ns(1), f"{SUBNET4}.2", port)
        made.cut(2)
        assert not await reaches(made.ns(1), f"{SUBNET4}.2", port)
        made.heal(2)
        assert await reaches(made.ns(1), f"{SUBNET4}.2", port)
        listener.close()
        names = sh("ip", "netns", "list").stdout
        assert made.ns(1) in names
    assert made.ns(1) not in sh("ip", "netns", "list").stdout  # removed on exit


async def test_nft_numgen_loss_drops_the_share_it_says() -> None:
    """500 datagrams through a 50% loss rule: between 150 and 350 arrive (p < 1e-19 off)."""
    with lab(2) as made:
        with inside(made.ns(2)):
            receiver = trio.socket.socket(type=socket.SOCK_DGRAM)
        with inside(made.ns(1)):
            sender = trio.socket.socket(type=socket.SOCK_DGRAM)
        with receiver, sender:
            # room for all 500 (as root, past rmem_max): a full buffer is loss we did not make
            receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            await receiver.bind((f"{SUBNET4}.2", 0))
            target = receiver.getsockname()
            await sender.sendto(b"warm", target)  # resolves the neighbour (ARP) first
            assert await receiver.recv(16) == b"warm"
            made.loss(1, 50)
            refused = 0
            for _ in range(500):
                try:
                    await sender.sendto(b"x", target)
                except PermissionError:  # an output-hook drop says EPERM to the sender
                    refused += 1
            arrived = 0
            while True:
                with trio.move_on_after(0.5) as quiet:
                    await receiver.recv(16)
                if quiet.cancelled_caught:
                    break
                arrived += 1
        assert 150 <= arrived <= 350, arrived
        assert arrived + refused == 500
