"""Records from Faust's consumer a partition's fetch at a time, not one event per message.

Faust hands its agents one event per Kafka message: an aiokafka record
becomes a Faust message, then an event, goes through the conductor, a
stream buffer and `take_events`, and is acknowledged one by one. With one
inference per message that path, not the enrichment, bounds the worker
(~80 us of event-loop time per message; benchmarks/README.md). Here the
consumer loop hands over the records of one partition's fetch as one
`Chunk` (faust_patches.batched_intake), the worker takes chunks up to a
batch, and once their rows and dead letters are durable acknowledges each
chunk's span of offsets at once into the bookkeeping Faust commits from.
Faust keeps the rest: the consumer group, rebalances, pausing, the commit
timer and the final commit.

What makes it safe:
- a chunk acknowledges the span from just after the partition's previous
  read offset to its last record, so offsets no record has (transaction
  markers, compacted records) do not hold commits back, as Faust's gap
  bookkeeping does per message;
- the worker acknowledges pieces in the order it took them, one at a time:
  Faust's commit scan stops at a missing offset only past an offset the
  group has committed, so acknowledging out of order would not be safe on a
  partition with no commit yet;
- offsets already acknowledged are not added twice (Faust's `ack` refuses
  them too; its commit scan would stop at a repeated offset);
- a rebalance empties the intake and starts a new epoch: chunks taken
  before it are still written, but not acknowledged. Faust seeks every
  assigned partition back to its committed offset after a rebalance, so they
  come again (and the table's view absorbs the repeat);
- a full intake holds the consumer loop (bounded memory, as a full stream
  buffer did), and a rebalance abandons a hand-over that waits for room, as
  Faust's own loop abandons a blocked one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from mode.utils.futures import notify

from enricher.stream.batch import Messages
from enricher.stream.contract import content_type


@dataclass
class Chunk:
    """Consecutive records of one partition, and the span of offsets they settle."""

    tp: Any  # the consumer's TopicPartition
    records: Sequence[Any]  # aiokafka ConsumerRecords, offsets rising
    start: int  # first offset acknowledged with them (gaps before the first record included)
    epoch: int  # the intake's epoch when the consumer handed them over

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bytes(self) -> int:
        return sum(len(r.value or b"") for r in self.records)

    def split(self, n: int) -> tuple["Chunk", "Chunk"]:
        """The first n records and the rest; the rest settles from just after the first part."""
        head, tail = self.records[:n], self.records[n:]
        return Chunk(self.tp, head, self.start, self.epoch), Chunk(self.tp, tail, head[-1].offset + 1, self.epoch)


class RecordIntake:
    """The inference topic's records between Faust's consumer loop and the worker."""

    def __init__(self, topic: str, max_records: int):
        self.topic = topic
        self.max_records = max_records  # held here before the consumer loop waits
        self.epoch = 0
        self._chunks: deque[Chunk] = deque()
        self._held = 0
        self._arrived: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._arrived is None:  # made on the event loop that uses them
            self._arrived, self._room = asyncio.Event(), asyncio.Event()
            self._loop = asyncio.get_running_loop()
        return self._arrived, self._room

    @property
    def held(self) -> int:
        return self._held

    # -- the consumer loop's side ----------------------------------------------------
    async def hand_over(self, consumer, tp, records: list) -> bool:
        """Take a partition's fetched records (called from Faust's consumer loop).

        Returns False when the flow was suspended (a rebalance) while waiting
        for room: the records are then dropped, as Faust drops a blocked
        hand-over, and come again from the committed offset.
        """
        read = consumer._read_offset
        r_offset = read.get(tp)
        # Faust processes a record whose offset is at least the read offset (after a seek the read
        # offset is the next one to read, otherwise the last one read): the same test here.
        if r_offset is not None and records[0].offset < r_offset:
            records = [r for r in records if r.offset >= r_offset]
            if not records:
                return True
        first = records[0].offset
        start = first if r_offset is None else min(first, r_offset + 1)
        committed = consumer._committed_offset.get(tp)
        if committed is not None:
            start = max(start, committed)  # Faust never acknowledges below the committed offset
        arrived, room = self._events()
        while self._held >= self.max_records:
            if consumer.suspend_flow.is_set():
                return False
            room.clear()
            await _first(room.wait(), consumer.suspend_flow.wait())
            if consumer.suspend_flow.is_set():
                return False
        self._chunks.append(Chunk(tp, records, start, self.epoch))
        self._held += len(records)
        read[tp] = records[-1].offset
        arrived.set()
        return True

    def revoke(self) -> None:
        """A rebalance begins: refuse acknowledgements of what was taken, and drop what is held.

        Faust calls its rebalance hook from its consumer thread (aiokafka's
        listener): the epoch moves at once, and what is held is dropped on the
        event loop that owns it."""
        self.epoch += 1
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or running is self._loop:
            self._drop_held()
        else:
            self._loop.call_soon_threadsafe(self._drop_held)

    def _drop_held(self) -> None:
        self._chunks.clear()
        self._held = 0
        if self._room is not None:
            self._room.set()

    # -- the worker's side ---------------------------------------------------------------
    async def take(self, max_records: int, within: float) -> list[Chunk]:
        """Chunks of up to max_records records: waits for the first, then up to
        `within` seconds for more (as Faust's take_events does)."""
        arrived, room = self._events()
        while not self._chunks:
            arrived.clear()
            await arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        taken: list[Chunk] = []
        count = 0
        while True:
            while self._chunks and count < max_records:
                chunk = self._chunks.popleft()
                if count + len(chunk) > max_records:
                    chunk, rest = chunk.split(max_records - count)
                    self._chunks.appendleft(rest)
                taken.append(chunk)
                count += len(chunk)
                self._held -= len(chunk)
            room.set()
            remaining = deadline - loop.time()
            if count >= max_records or remaining <= 0:
                return taken
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            if not self._chunks:
                return taken

    def acknowledge(self, consumer, chunks: list[Chunk]) -> int:
        """Hand durable chunks' offsets to Faust's commit bookkeeping; returns how
        many offsets were acknowledged (stale chunks, from before a rebalance, add none)."""
        from faust.types.tuples import ack_lock

        added = 0
        with ack_lock:  # Faust's own ack takes it: its bookkeeping is shared with other threads
            for chunk in chunks:
                if chunk.epoch != self.epoch or not chunk.records:
                    continue
                tp = chunk.tp
                span = range(chunk.start, chunk.records[-1].offset + 1)
                if not span:
                    continue
                index = consumer._acked_index[tp]
                if not index.isdisjoint(span):  # seen again after a seek: only what is new
                    span = [offset for offset in span if offset not in index]
                consumer._acked[tp].extend(span)
                index.update(span)
                added += len(span)
            consumer._n_acked += added
        notify(consumer._waiting_for_ack)
        return added


async def _first(*waits) -> None:
    """Wait until one of the awaitables is done; cancel the others (rare: a full intake)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def pieces(chunks: list[Chunk], max_bytes: int) -> Iterator[list[Chunk]]:
    """Consecutive runs of chunks whose values add up to about max_bytes; a
    chunk is cut where the bound falls (a piece ends with the record that
    reaches it), so batched messages never make a piece far over it."""
    piece: list[Chunk] = []
    size = 0
    queue = deque(chunks)
    while queue:
        chunk = queue.popleft()
        chunk_bytes = chunk.bytes
        if size + chunk_bytes < max_bytes:
            piece.append(chunk)
            size += chunk_bytes
            continue
        # the bound falls inside this chunk: find the record that reaches it
        for i, record in enumerate(chunk.records):
            size += len(record.value or b"")
            if size >= max_bytes:
                break
        if i + 1 < len(chunk):
            chunk, rest = chunk.split(i + 1)
            queue.appendleft(rest)
        piece.append(chunk)
        yield piece
        piece, size = [], 0
    if piece:
        yield piece


def messages(chunks: list[Chunk]) -> Messages:
    """A piece's records column by column: a few attribute reads per record."""
    if len(chunks) == 1:
        records = chunks[0].records
    else:
        records = [r for chunk in chunks for r in chunk.records]
    headers = [r.headers for r in records]
    return Messages([r.value for r in records], [r.partition for r in records], [r.offset for r in records],
                    [content_type(h) for h in headers] if any(headers) else None)
