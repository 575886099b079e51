"""The intake between Faust's consumer and the worker (enricher/stream/intake.py):
what it acknowledges is what Faust then commits, on Faust's own consumer
bookkeeping (`_new_offset` is the scan Faust's commit makes). The stream tests
(test_stream.py, test_shutdown_and_hangs.py, test_hostile.py) run the whole
worker on this path against a real broker and store."""

import asyncio

import faust
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from enricher.stream.intake import RecordIntake, messages, pieces

TOPIC = "inferences"
P0, P1 = TP(TOPIC, 0), TP(TOPIC, 1)


def record(tp, offset, value=b"{}", headers=()):
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, None, value, None, 0, len(value or b""),
                          headers)


def records(tp, offsets, value=b"{}"):
    return [record(tp, o, value) for o in offsets]


@pytest.fixture
def consumer():
    app = faust.App("intake-test", broker="kafka://localhost:1")  # never connects: bookkeeping only
    return app.consumer


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def committable(consumer, tp):
    """The offset Faust's next commit would write for tp (None: nothing new)."""
    return consumer._new_offset(tp)


def test_durable_chunks_commit_to_one_past_their_last_offset(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        assert await intake.hand_over(consumer, P0, records(P0, range(0, 5)))
        assert await intake.hand_over(consumer, P1, records(P1, range(0, 3)))
        assert await intake.hand_over(consumer, P0, records(P0, range(5, 9)))
        taken = await intake.take(100, 0.01)
        assert sum(map(len, taken)) == 12
        assert intake.acknowledge(consumer, taken) == 12
        assert committable(consumer, P0) == 9 and committable(consumer, P1) == 3

    run(main())


def test_offsets_without_records_do_not_hold_commits_back(consumer):
    # Transaction markers and compacted records leave offsets no record has.
    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        await intake.hand_over(consumer, P0, records(P0, [0, 1, 2, 5, 6]))
        await intake.hand_over(consumer, P0, records(P0, [9]))
        intake.acknowledge(consumer, await intake.take(100, 0.01))
        assert committable(consumer, P0) == 10

    run(main())


def test_a_later_chunk_durable_first_commits_nothing_past_the_earlier_one(consumer):
    async def main():
        # (The worker acknowledges in order; Faust's scan guards the head only once an
        # offset was committed, as here: the group's committed offset read at assignment.)
        intake = RecordIntake(TOPIC, max_records=1000)
        consumer._committed_offset[P0] = consumer._read_offset[P0] = 10
        await intake.hand_over(consumer, P0, records(P0, range(10, 14)))
        await intake.hand_over(consumer, P0, records(P0, range(14, 18)))
        first, second = await intake.take(100, 0.01)
        intake.acknowledge(consumer, [second])
        assert committable(consumer, P0) is None  # 10-13 are not durable yet
        intake.acknowledge(consumer, [first])
        assert committable(consumer, P0) == 18

    run(main())


def test_records_fetched_again_after_a_seek_are_not_acknowledged_twice(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        await intake.hand_over(consumer, P0, records(P0, range(0, 8)))
        intake.acknowledge(consumer, await intake.take(100, 0.01))
        # Faust seeks back to the committed offset (say 5: 0-4 committed) and sets the read offset there.
        consumer._committed_offset[P0] = 5
        consumer._read_offset[P0] = 5
        consumer._acked[P0][:] = [5, 6, 7]
        consumer._acked_index[P0].intersection_update({5, 6, 7})
        await intake.hand_over(consumer, P0, records(P0, range(3, 11)))  # the fetch may start before it
        taken = await intake.take(100, 0.01)
        assert [r.offset for r in taken[0].records] == list(range(5, 11))  # what Faust would process
        assert intake.acknowledge(consumer, taken) == 3  # 8, 9, 10: 5-7 were acknowledged already
        assert sorted(consumer._acked[P0]) == list(range(5, 11))  # no repeat: Faust's scan would stop at one
        assert committable(consumer, P0) == 11

    run(main())


def test_a_rebalance_drops_what_is_held_and_refuses_acks_of_what_was_taken(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        await intake.hand_over(consumer, P0, records(P0, range(0, 4)))
        taken = await intake.take(100, 0.01)
        await intake.hand_over(consumer, P0, records(P0, range(4, 8)))
        intake.revoke()
        assert intake.held == 0
        assert intake.acknowledge(consumer, taken) == 0
        assert committable(consumer, P0) is None  # they come again from the committed offset
        await intake.hand_over(consumer, P1, records(P1, range(0, 2)))
        later = await intake.take(100, 0.01)
        assert [c.tp for c in later] == [P1] and intake.acknowledge(consumer, later) == 2

    run(main())


def test_a_rebalance_signalled_from_fausts_consumer_thread_drops_the_held_chunks_on_the_loop(consumer):
    import threading

    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        await intake.hand_over(consumer, P0, records(P0, range(0, 4)))
        taken = await intake.take(100, 0.01)
        await intake.hand_over(consumer, P0, records(P0, range(4, 8)))
        async def listener():  # aiokafka's rebalance listener: in Faust's consumer thread, on its own loop
            intake.revoke()

        thread = threading.Thread(target=lambda: asyncio.run(listener()))
        thread.start()
        thread.join()
        assert intake.acknowledge(consumer, taken) == 0  # the epoch moved at once
        await asyncio.sleep(0)  # the held chunks go on this loop's next turn
        assert intake.held == 0

    run(main())


def test_a_take_stops_at_the_batch_size_mid_chunk_and_the_rest_comes_next(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        await intake.hand_over(consumer, P0, records(P0, [0, 1, 4, 5, 6]))
        first = await intake.take(3, 0.01)
        assert [r.offset for c in first for r in c.records] == [0, 1, 4]
        intake.acknowledge(consumer, first)
        assert committable(consumer, P0) == 5
        second = await intake.take(3, 0.01)
        assert [r.offset for c in second for r in c.records] == [5, 6]
        intake.acknowledge(consumer, second)
        assert committable(consumer, P0) == 7

    run(main())


def test_a_take_waits_for_the_first_chunk_then_at_most_its_window(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        taking = asyncio.ensure_future(intake.take(100, 0.2))
        await asyncio.sleep(0.05)
        assert not taking.done()
        await intake.hand_over(consumer, P0, records(P0, range(0, 2)))
        await asyncio.sleep(0.05)
        await intake.hand_over(consumer, P0, records(P0, range(2, 4)))  # within the window: same batch
        taken = await taking
        assert [r.offset for c in taken for r in c.records] == [0, 1, 2, 3]

    run(main())


def test_a_full_intake_holds_the_consumer_until_the_worker_takes(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=4)
        await intake.hand_over(consumer, P0, records(P0, range(0, 4)))
        waiting = asyncio.ensure_future(intake.hand_over(consumer, P0, records(P0, range(4, 6))))
        await asyncio.sleep(0.05)
        assert not waiting.done() and consumer._read_offset[P0] == 3
        await intake.take(100, 0)
        assert await asyncio.wait_for(waiting, 2) is True
        assert consumer._read_offset[P0] == 5

    run(main())


def test_a_hand_over_waiting_for_room_is_abandoned_when_a_rebalance_suspends_the_flow(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=4)
        await intake.hand_over(consumer, P0, records(P0, range(0, 4)))
        waiting = asyncio.ensure_future(intake.hand_over(consumer, P0, records(P0, range(4, 6))))
        await asyncio.sleep(0.05)
        consumer.suspend_flow.set()
        assert await asyncio.wait_for(waiting, 2) is False
        assert consumer._read_offset[P0] == 3  # not read: fetched again after the seek

    run(main())


def test_pieces_cut_inside_a_chunk_where_the_bytes_run_out_and_settle_every_offset(consumer):
    async def main():
        intake = RecordIntake(TOPIC, max_records=1000)
        await intake.hand_over(consumer, P0, [record(P0, o, b"x" * 400) for o in (0, 1, 2, 7)])
        await intake.hand_over(consumer, P1, [record(P1, 0, b"x" * 1200)])
        await intake.hand_over(consumer, P0, [record(P0, o, b"x" * 10) for o in (8, 9, 10)])
        taken = await intake.take(100, 0.01)
        cut = list(pieces(taken, 1000))
        sizes = [[len(r.value) for c in piece for r in c.records] for piece in cut]
        assert sizes == [[400, 400, 400], [400, 1200], [10, 10, 10]]
        for piece in cut:
            intake.acknowledge(consumer, piece)
        assert committable(consumer, P0) == 11 and committable(consumer, P1) == 1

    run(main())


def test_a_pieces_messages_are_its_records_column_by_column():
    chunk_records = [record(P0, 3, b"a"), record(P0, 4, None, headers=(("Content-Type", b"application/json"),))]
    from enricher.stream.intake import Chunk

    batch = messages([Chunk(P0, chunk_records, 3, 0), Chunk(P1, [record(P1, 9, b"c")], 9, 0)])
    assert batch.values == [b"a", None, b"c"]
    assert batch.partitions == [0, 0, 1] and batch.offsets == [3, 4, 9]
    assert batch.content_types == [None, "application/json", None]
