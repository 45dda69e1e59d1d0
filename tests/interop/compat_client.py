"""An official python-socketio client app, unchanged, for tests/compat.rs:
connects, subscribes to the rooms given, prints `READY <sid>`, records every
event (the device state events aside) until `done`, then prints them as
`EVENTS <json>` and `OK`.

usage: python compat_client.py <nodeUrl> <rooms, comma-separated or "-">
"""
import asyncio
import json
import sys

import socketio

STATE = {"apps_list", "current_app", "settings", "carousel_config", "subscribed"}


async def main(url: str, rooms: list[str]) -> None:
    sio = socketio.AsyncClient(reconnection=False)
    events: list = []
    done = asyncio.Event()

    @sio.on("*")
    async def any_event(event, *args):
        if event in STATE:
            return
        events.append([event, *args])
        if event == "done":
            done.set()

    await sio.connect(url, transports=["websocket"], wait_timeout=5)
    for room in rooms:
        ack = await sio.call("subscribe", room, timeout=5)
        assert ack.get("ok"), f"subscribe {room}: {ack}"
    # The namespace sid (what a server handler gets as `sid`), not
    # `sio.sid`, which is the Engine.IO session id.
    print("READY", sio.get_sid(), flush=True)
    await asyncio.wait_for(done.wait(), 60)
    print("EVENTS " + json.dumps(events), flush=True)
    print("OK", flush=True)
    await sio.disconnect()


if __name__ == "__main__":
    rooms = [] if sys.argv[2] == "-" else sys.argv[2].split(",")
    asyncio.run(main(sys.argv[1], rooms))
