"""python-socketio's own server, as the reference of tests/compat.rs: what
Switchboard delivers for an emit must be what this server delivers for it.

An aiohttp AsyncServer on the given port with an AsyncRedisManager on the
given channel (so external RedisManager emits reach it, as in a python-socketio
cluster), and the one handler the test clients use: `subscribe` (enter the
room, acknowledge {"ok": true}). Prints `LISTENING <port>`; runs until killed.

usage: python compat_reference_server.py <redisUrl> <channel> <port>
"""
import asyncio
import sys

import socketio
from aiohttp import web


async def main() -> None:
    url, channel, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=socketio.AsyncRedisManager(url, channel=channel),
    )

    @sio.on("subscribe")
    async def subscribe(sid, room):
        await sio.enter_room(sid, room)
        return {"ok": True, "topic": room}

    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("LISTENING", port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
