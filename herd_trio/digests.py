"""Answering a peer's DIGEST without letting the peer amplify or stall the server.

A DIGEST is 4 KB; answering one can mean sending the whole store (an all-zero digest
says "I hold nothing"). A neighbour that passed the handshake could otherwise send
digests back to back and make the server resend its store for each, while the event
loop is busy preparing the answers (issue 12: 20 KB in, 7.4 MB out, clients stalled
~100 ms each). So, per link:

* `DigestGate` answers at most one DIGEST per interval (half of `sync_interval`: an
  honest peer sends one at link-up and then at most one per `sync_interval`). A few
  early digests are ignored (a stalled link can deliver two close together); past
  that allowance the peer is misbehaving and the link is dropped.
* `answer_digest` walks a snapshot of the store in chunks of CHUNK records with a
  checkpoint after each, so the loop keeps serving clients while a large answer is
  prepared, and stops once ANSWER_BUDGET bytes are queued. The next answer resumes
  where the last one stopped, so a peer that lacks more than a budget's worth still
  gets everything, one budget per interval.

The digest itself is replaced by range-based reconciliation in a later issue (issue
11); this module is the piece to replace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import attrs
import trio

from herd_trio.protocol import Record
from herd_trio.store import Store, bucket_of

CHUNK = 1000  # records examined between checkpoints: well under a millisecond of work
ANSWER_BUDGET = 32 << 20  # bytes one answer may queue: a 300k-record store; the rest follows
EARLY_ALLOWANCE = 3  # early DIGESTs ignored per interval before the link is dropped

Verdict = Literal["answer", "ignore", "drop"]


@attrs.define
class DigestGate:
    """Whether a peer's DIGEST is answered, ignored, or ends the link; no I/O."""

    interval: float  # seconds: at most one answer per interval
    allowance: int = EARLY_ALLOWANCE
    answered_at: float = -math.inf
    early: int = 0  # DIGESTs since the last answer that came too soon

    def verdict(self, now: float) -> Verdict:
        """What to do with a DIGEST that arrived at `now` (and note it)."""
        if now - self.answered_at >= self.interval:
            self.answered_at, self.early = now, 0
            return "answer"
        self.early += 1
        return "drop" if self.early > self.allowance else "ignore"


@attrs.frozen
class Answer:
    """What one answer queued, and where the next one starts."""

    records: int
    size: int  # bytes, AT lines with their LFs
    resume: int  # index into the store's order for the next answer
    complete: bool  # False if the budget cut it short


async def answer_digest(
    store: Store,
    theirs: list[int],
    queue: Callable[[Record], None],
    *,
    start: int = 0,
    budget: int = ANSWER_BUDGET,
) -> Answer:
    """Queue every record of each bucket where `theirs` differs from `store`'s digest.

    Walks the store from index `start` (wrapping round), CHUNK records between
    checkpoints, and stops once `budget` bytes are queued. Records superseded while
    the walk waits at a checkpoint are skipped: the newer one travels by the flood.
    Always checkpoints. The store never drops a client, so its order only grows at
    the end and an index stays valid from one answer to the next.
    """
    buckets = store.differing_buckets(theirs)
    records = store.snapshot() if buckets else []
    count = len(records)
    if not count:
        await trio.lowlevel.checkpoint()
        return Answer(0, 0, 0, True)
    start %= count
    queued = size = 0
    for offset in range(0, count, CHUNK):
        for step in range(offset, min(offset + CHUNK, count)):
            record = records[(start + step) % count]
            if bucket_of(record.client) not in buckets or store.get(record.client) is not record:
                continue
            queue(record)
            queued += 1
            size += len(record.at_line) + 1
            if size >= budget:
                await trio.lowlevel.checkpoint()
                return Answer(queued, size, (start + step + 1) % count, False)
        await trio.lowlevel.checkpoint()
    return Answer(queued, size, start, True)


class PeerMisbehaved(Exception):
    """The peer kept asking for more than a link allows; the link is dropped."""


@attrs.define(eq=False)
class DigestReplies:
    """One link's answers to its peer's DIGESTs: gated, chunked, resumed."""

    store: Store
    queue: Callable[[Record], None]  # the link writer's queue (no direct send)
    log: Callable[[str], None]
    peer: str
    gate: DigestGate
    budget: int = ANSWER_BUDGET
    _resume: int = attrs.field(default=0, init=False)

    async def reply(self, theirs: list[int]) -> int:
        """Answer the peer's DIGEST `theirs`, ignore it, or raise PeerMisbehaved; how
        many records were queued for the peer.

        Always checkpoints.
        """
        verdict = self.gate.verdict(trio.current_time())
        if verdict == "drop":
            raise PeerMisbehaved(
                f"{self.peer} sent {self.gate.early} DIGESTs within {self.gate.interval:g} s"
                f" of the last answer (one is answered per {self.gate.interval:g} s)"
            )
        if verdict == "ignore":
            await trio.lowlevel.checkpoint()
            return 0
        answer = await answer_digest(
            self.store, theirs, self.queue, start=self._resume, budget=self.budget
        )
        self._resume = answer.resume
        if answer.records:
            rest = "" if answer.complete else "; the rest after its next DIGEST"
            self.log(
                f"sync with {self.peer}: sending {answer.records} records"
                f" ({answer.size} bytes){rest}"
            )
        return answer.records
