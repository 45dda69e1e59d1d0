"""Rate-limited clients must get what they are owed, every time.

Usage: ws_rate_limit.py WS_URL PINGS RUNS

Each run connects, sends PINGS `{"type":"ping"}` messages as separate
writes (one `send` each, no batching) while another task reads, and checks
that the client received pongs, then `error` `rate_limited` as the last
message, then a Close frame with code 1008 — never an abnormal close
(1006, the symptom of a TCP reset). Prints OK when every run passed.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def once(url: str, pings: int) -> None:
    ws = await connect(url, ping_interval=None, close_timeout=5)
    hello = json.loads(await ws.recv())
    assert hello["type"] == "connected", hello
    got = []

    async def reader():
        try:
            while True:
                got.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass

    task = asyncio.create_task(reader())
    try:
        for _ in range(pings):
            await ws.send('{"type":"ping"}')
    except ConnectionClosed:
        pass
    await asyncio.wait_for(task, 10)
    await asyncio.wait_for(ws.wait_closed(), 10)
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None, f"no Close frame received (close code {ws.close_code}): reset?"
    assert rcvd.code == 1008, f"close code {rcvd.code}"
    types = [m["type"] for m in got]
    assert types, "no messages"
    assert types[-1] == "error" and got[-1]["code"] == "rate_limited", got[-3:]
    assert all(t == "pong" for t in types[:-1]), types
    # The burst (twice the rate) is answered before the limit trips.
    assert len(types) - 1 >= 50, f"only {len(types) - 1} pongs"


async def main() -> None:
    url, pings, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(runs):
        try:
            await once(url, pings)
        except AssertionError as e:
            print(f"run {i} with {pings} pings failed: {e}")
            sys.exit(1)
    print(f"OK: {runs} runs of {pings} pings")


asyncio.run(main())
