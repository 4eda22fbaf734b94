"""The decode actor's stream: outputs put on the engine loop thread reach the asyncio side with one wake-up per
burst, and a consumer that lags receives the piled-up tokens merged, in order, with nothing lost."""

from __future__ import annotations

import asyncio
import threading

from decode_worker.stream import OutputQueue, StepMailbox, next_outputs
from engine.outputs import RequestOutput


def output(rid: str, tokens: list[int], n_new: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [1], list(tokens), tokens[-n_new:], text="".join(f"<{t}>" for t in tokens),
                         finished=finished, finish_reason="length" if finished else None)


def test_a_step_burst_costs_one_wakeup_and_a_lagging_consumer_gets_it_merged() -> None:
    async def main() -> None:
        mailbox = StepMailbox(asyncio.get_running_loop())
        a: OutputQueue = asyncio.Queue()
        b: OutputQueue = asyncio.Queue()
        put_a, put_b = mailbox.sink(a), mailbox.sink(b)

        def engine_thread() -> None:  # three steps of two requests, put before the loop gets to run
            for step in range(1, 4):
                put_a(output("a", list(range(10, 10 + step)), 1, finished=step == 3))
                put_b(output("b", list(range(20, 20 + step)), 1))

        t = threading.Thread(target=engine_thread)
        t.start()
        t.join()
        assert mailbox.wakeups == 1  # six outputs, one wake-up
        await asyncio.sleep(0)
        out, tokens, merged, _ = await next_outputs(a)
        assert (tokens, merged, out.finished, out.text) == ([10, 11, 12], 3, True, "<10><11><12>")
        out, tokens, merged, _ = await next_outputs(b)
        assert (tokens, merged, out.finished) == ([20, 21, 22], 3, False)
        put_b(output("b", [20, 21, 22, 23], 1, finished=True))
        put_b(output("b", [20, 21, 22, 23, 24], 1))  # never merged past the final output
        out, tokens, merged, _ = await next_outputs(b)
        assert (tokens, merged, out.finished) == ([23], 1, True) and mailbox.wakeups == 2

    asyncio.run(main())
