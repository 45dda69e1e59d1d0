"""Closes started by the client are answered with the server's Close frame.

Usage: client_close.py HTTP_BASE PROXY_ROUTE

For each WebSocket the node terminates (native `/ws` and `/ws/{topic}`, our
Engine.IO websocket transport, a socket upgraded from
long-polling, and the proxy's client leg `/ws/proxy/{route}`), a Python
`websockets` client opens it, waits until the server has spoken, closes
with 1000 and checks that it received the server's Close frame with code
1000 (`close_code == 1000`, never the 1006 of a connection that ended
without one) and that the TCP connection ended soon after (the lingering
close). On `/ws` it also checks that another code is echoed (4321).
Prints OK when all held.
"""

import asyncio
import json
import sys
import time

import httpx
from websockets.asyncio.client import connect


async def engineio_open(ws):
    """Our transport: OPEN, then the Socket.IO CONNECT of namespace `/`."""
    opened = await ws.recv()
    assert opened.startswith("0{"), opened
    await ws.send("40")
    while not (await ws.recv()).startswith("40"):
        pass


async def acked(ws):
    """A Socket.IO event with an ack: the socket is fully up when it comes back."""
    await ws.send('421["subscribe","news"]')
    while not (await ws.recv()).startswith("431"):
        pass


async def close_and_check(url, setup, code=1000, expect=1000):
    ws = await connect(url, ping_interval=None, close_timeout=5)
    await setup(ws)
    started = time.monotonic()
    await ws.close(code)
    took = time.monotonic() - started
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None, f"{url}: no Close frame from the server (close_code {ws.close_code})"
    assert ws.close_code == expect, f"{url}: close_code {ws.close_code}, expected {expect}"
    assert took < 4, f"{url}: the close took {took:.2f} s (no TCP close from the server?)"
    print(f"{url}: sent {code}, got Close {rcvd.code} in {took * 1000:.0f} ms")


async def first_frame(ws):
    await ws.recv()


async def main(base, route):
    wsbase = base.replace("http://", "ws://")
    await close_and_check(f"{wsbase}/ws", first_frame)
    await close_and_check(f"{wsbase}/ws/news", first_frame)
    await close_and_check(f"{wsbase}/ws", first_frame, code=4321, expect=4321)

    # Our Engine.IO websocket transport.
    async def ours(ws):
        await engineio_open(ws)
        await acked(ws)

    await close_and_check(f"{wsbase}/socket.io/?EIO=4&transport=websocket", ours)

    # A long-polling session upgraded to websocket.
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{base}/socket.io/?EIO=4&transport=polling")
        sid = json.loads(r.text[1:])["sid"]
        await http.post(f"{base}/socket.io/?EIO=4&transport=polling&sid={sid}", content="40")
        r = await http.get(f"{base}/socket.io/?EIO=4&transport=polling&sid={sid}")
        assert "40{" in r.text, r.text

    async def upgraded(ws):
        await ws.send("2probe")
        assert await ws.recv() == "3probe"
        await ws.send("5")
        await acked(ws)

    await close_and_check(f"{wsbase}/socket.io/?EIO=4&transport=websocket&sid={sid}", upgraded)

    async def proxied(ws):
        hello = json.loads(await ws.recv())
        assert hello["type"] == "proxy_connected", hello
        await ws.send("echo me")
        assert await ws.recv() == "echo me"

    await close_and_check(f"{wsbase}/ws/proxy/{route}", proxied)
    print("OK")


asyncio.run(main(sys.argv[1], sys.argv[2]))
