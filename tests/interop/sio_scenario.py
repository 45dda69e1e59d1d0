"""Drives the official python-socketio AsyncClient against two Switchboard nodes.

usage: python sio_scenario.py <clientNodeUrl> <otherNodeUrl> [websocket]
With "websocket" the client opens on the websocket transport (the node's own
Engine.IO transport) instead of long-polling with an upgrade.
Exits 0 when every step held; prints what it checked.
"""
import asyncio
import json
import sys
import time

import aiohttp
import socketio

STATE_EVENTS = ["apps_list", "current_app", "settings", "carousel_config"]


def log(*a):
    print("[python]", *a, flush=True)


async def main(here: str, there: str) -> None:
    seen: list[tuple[str, object, float]] = []
    sio = socketio.AsyncClient(reconnection=False)

    @sio.on("*")
    async def any_event(event, data=None, *_position):
        seen.append((event, data, time.monotonic()))

    async def wait_for(pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in seen:
                if pred(item):
                    return item
            await asyncio.sleep(0.01)
        raise AssertionError(f"timeout waiting for {what}")

    async with aiohttp.ClientSession() as http:

        async def post(path, body):
            async with http.post(there + path, json=body) as r:
                return r.status, await r.json()

        transports = ["websocket"] if sys.argv[3:] == ["websocket"] else ["polling", "websocket"]
        await sio.connect(here, transports=transports, wait_timeout=5)
        log("connected", sio.sid, "via", sio.transport())
        for ev in STATE_EVENTS:
            await wait_for(lambda s, ev=ev: s[0] == ev, 5, ev)
        log("received the four state events on connect")

        seen.clear()
        await sio.emit("request_state")
        for ev in STATE_EVENTS:
            await wait_for(lambda s, ev=ev: s[0] == ev, 5, ev + " after request_state")
        log("request_state answered")

        seen.clear()
        sent = time.monotonic()
        status, body = await post("/api/switch", {"app": "clock"})
        assert status == 200, (status, body)
        hit = await wait_for(lambda s: s[0] == "current_app" and s[1]["app"] == "clock", 1, "current_app clock within 1 s")
        log(f"current_app clock arrived {1000 * (hit[2] - sent):.0f} ms after the command on the other node")

        status, body = await post("/api/switch", {"app": "tetris"})
        assert status == 400 and "tetris" in body["error"], (status, body)
        log("unknown app refused:", body["error"])

        ack = await sio.call("subscribe", {"topic": "news"}, timeout=5)
        assert ack["ok"] is True, ack
        status, _ = await post("/api/publish", {"topic": "news", "event": "headline", "data": {"n": 9}})
        assert status == 202
        hit = await wait_for(lambda s: s[0] == "headline", 3, "headline event")
        assert hit[1] == {"n": 9}, hit
        log("subscribe + cross-node publish delivered")

        ack = await sio.call("unsubscribe", "news", timeout=5)
        assert ack["ok"] is True, ack
        await sio.disconnect()
        log("OK")


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 30))
    except Exception as e:  # noqa: BLE001 - report any failure as the scenario's
        print(f"[python] FAIL: {e!r}", file=sys.stderr, flush=True)
        sys.exit(1)
