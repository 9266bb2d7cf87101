"""The second publisher process of ``hub-publish-library-2proc``: a key and a state of its own, the scenario's topics.

Started by the scenario with the bootstrap address and the jurisdictions; prints ``ready`` once its couriers hold
their fences, then for each line ``N`` on stdin publishes N events the way ``hub-publish-library`` does (untimed
here: the scenario times both processes together) and prints ``<records> <CPU seconds>``. Stops at end of input.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.harness import Context
from bench.scenarios_hub import _publish_library, _publisher_setup


async def main(bootstrap: str, jurisdictions: list[str]) -> None:
    ctx = Context(bootstrap=bootstrap, scenario="publish-worker", events=0, record_size=0)
    ctx.state.update(jurisdictions=jurisdictions, prefix="WORKER")
    await _publisher_setup(ctx)
    loop = asyncio.get_running_loop()
    try:
        print("ready", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            ctx.events = int(line)
            cpu = time.process_time()
            records = await _publish_library(ctx, timed=False)
            print(records, time.process_time() - cpu, flush=True)
    finally:
        await _publisher_teardown_topics_kept(ctx)


async def _publisher_teardown_topics_kept(ctx: Context) -> None:
    """The scenario's process owns (and deletes) the topics."""
    await ctx.state["outbox"].stop(5.0)
    ctx.state["committer"].close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
