"""python-socketio recovers missed publications of a history topic.

usage: python sio_recover.py <nodeA> <nodeB> <redisPort> <prefix>
Subscribes on A with the object form, sees offsets, disconnects; 10
publications go out through node B; reconnects to B with {topic, offset,
epoch}: the ack says recovered, the 10 arrive in order, then live ones.
"""
import asyncio
import sys

import aiohttp
import socketio


def log(*a):
    print("[python recover]", *a, flush=True)


async def main(a: str, b: str) -> None:
    async with aiohttp.ClientSession() as http:

        async def publish(n):
            async with http.post(b + "/api/publish", json={"topic": "news", "data": {"n": n}}) as r:
                assert r.status == 202, await r.text()
                return (await r.json())["data"]

        received = []
        sio = socketio.AsyncClient(reconnection=False)

        @sio.on("news")
        async def on_news(data, position):
            received.append((data["n"], position["offset"], position["topic"]))

        await sio.connect(a, wait_timeout=5)
        ack = await sio.call("subscribe", {"topic": "news"}, timeout=5)
        assert ack["ok"] is True and "epoch" in ack, ack
        epoch, offset = ack["epoch"], ack["offset"]
        first = await publish(1)
        # Nothing was published before: the ack's epoch is a pending one
        # ("~…"), which the first publication's epoch continues.
        assert first["offset"] == offset + 1, (first, ack)
        assert first["epoch"] == epoch or epoch.startswith("~"), (first, ack)
        for _ in range(300):
            if received:
                break
            await asyncio.sleep(0.01)
        assert received == [(1, offset + 1, "news")], received
        last = received[-1][1]
        await sio.disconnect()
        log("subscribed with the object form; offsets arrive as a second argument")

        for n in range(2, 12):
            await publish(n)

        received.clear()
        sio = socketio.AsyncClient(reconnection=False)
        sio.on("news", on_news)
        await sio.connect(b, wait_timeout=5)
        ack = await sio.call("subscribe", {"topic": "news", "offset": last, "epoch": epoch}, timeout=5)
        assert ack["ok"] is True and ack["recovered"] is True, ack
        await publish(12)
        for _ in range(500):
            if len(received) >= 11:
                break
            await asyncio.sleep(0.01)
        assert [r[0] for r in received] == list(range(2, 13)), received
        assert [r[1] for r in received] == list(range(last + 1, last + 12)), received
        log("recovered 10 missed publications in order, then live")

        # A plain string subscription keeps one-argument events.
        plain = []
        sio2 = socketio.AsyncClient(reconnection=False)

        @sio2.on("news")
        async def one_arg(data):
            plain.append(data["n"])

        await sio2.connect(a, wait_timeout=5)
        ack = await sio2.call("subscribe", "news", timeout=5)
        assert ack["ok"] is True, ack
        await publish(13)
        for _ in range(300):
            if plain:
                break
            await asyncio.sleep(0.01)
        assert plain == [13], plain
        await sio.disconnect()
        await sio2.disconnect()
        log("OK")


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 30))
    except Exception as e:  # noqa: BLE001 - report any failure as the scenario's
        print(f"[python recover] FAIL: {e!r}", file=sys.stderr, flush=True)
        sys.exit(1)
