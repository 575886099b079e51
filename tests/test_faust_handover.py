"""The eager hand-over (enricher/stream/faust_patches.py) behaves as Faust's own
`wait_first(callback(message), suspend_flow.wait())`: the callback runs to its
end, errors reach the loop, and a hand-over that waits is abandoned when a
rebalance suspends the flow. Only the common case, a callback that never
waits, runs without tasks."""

import asyncio

import pytest
from mode import Service

from enricher.stream.faust_patches import _hand_over


class Consumer(Service):
    """What the hand-over uses of Faust's consumer: a mode Service (for
    wait_first) with a suspend_flow event."""

    def __init__(self):
        super().__init__()
        self.suspend_flow = asyncio.Event()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_callback_that_never_waits_is_done_without_one_event_loop_turn():
    handed = []

    async def callback(message):
        handed.append(message)

    async def main():
        step = _hand_over(Consumer(), callback, "m1")
        with pytest.raises(StopIteration):  # finished on its first step: no suspension, no task
            step.send(None)
        assert handed == ["m1"]

    run(main())


def test_a_callback_blocked_on_a_full_buffer_finishes_when_room_appears():
    async def main():
        queue = asyncio.Queue(maxsize=1)
        queue.put_nowait("earlier")

        async def callback(message):
            await queue.put(message)

        hand_over = asyncio.ensure_future(_hand_over(Consumer(), callback, "m2"))
        await asyncio.sleep(0.05)
        assert not hand_over.done()
        assert queue.get_nowait() == "earlier"
        await asyncio.wait_for(hand_over, 2)
        assert queue.get_nowait() == "m2"

    run(main())


def test_a_blocked_hand_over_is_abandoned_and_cancelled_when_the_flow_is_suspended():
    async def main():
        consumer = Consumer()
        never = asyncio.Event()
        cancelled = []

        async def callback(message):
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.append(message)
                raise

        hand_over = asyncio.ensure_future(_hand_over(consumer, callback, "m3"))
        await asyncio.sleep(0.05)
        consumer.suspend_flow.set()  # a rebalance starts
        await asyncio.wait_for(hand_over, 2)
        await asyncio.sleep(0.01)
        assert cancelled == ["m3"]

    run(main())


def test_with_the_flow_already_suspended_a_waiting_callback_is_not_waited_for():
    async def main():
        consumer = Consumer()
        consumer.suspend_flow.set()

        async def callback(message):
            await asyncio.Event().wait()

        await asyncio.wait_for(_hand_over(consumer, callback, "m4"), 2)

    run(main())


def test_errors_raised_after_a_wait_reach_the_consumer_loop():
    async def main():
        async def callback(message):
            await asyncio.sleep(0.01)
            raise ValueError(f"cannot decode {message}")

        with pytest.raises(ValueError, match="cannot decode m5"):
            await _hand_over(Consumer(), callback, "m5")

    run(main())


def test_a_callback_that_waits_many_times_on_tasks_and_loop_turns_gets_every_result():
    # The conductor's full-buffer path: asyncio.wait over ensure_future(put(...)), plus bare yields.
    async def main():
        seen = []

        async def put(value):
            await asyncio.sleep(0.01)
            return value * 2

        async def callback(message):
            await asyncio.sleep(0)
            done, _ = await asyncio.wait([asyncio.ensure_future(put(i)) for i in range(3)])
            seen.extend(sorted(f.result() for f in done))
            await asyncio.sleep(0)
            seen.append(await asyncio.shield(put(message)))

        await _hand_over(Consumer(), callback, 10)
        assert seen == [0, 2, 4, 20]

    run(main())


def test_cancelling_the_consumer_loop_cancels_the_callback_it_waits_for():
    async def main():
        entered, cancelled = asyncio.Event(), []

        async def callback(message):
            entered.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(message)
                raise

        loop_task = asyncio.ensure_future(_hand_over(Consumer(), callback, "m6"))
        await entered.wait()
        loop_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop_task
        await asyncio.sleep(0.01)
        assert cancelled == ["m6"]

    run(main())
