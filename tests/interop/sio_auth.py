"""python-socketio against a node with AUTH_JWT_SECRET: refused without
auth.token, admitted with it.

usage: python sio_auth.py <url> <token> [websocket]
With "websocket" the client opens on the websocket transport (the node's own
Engine.IO transport) instead of long-polling.
"""
import asyncio
import sys

import socketio


TRANSPORTS = ["websocket"] if sys.argv[3:] == ["websocket"] else ["polling", "websocket"]


async def main(url: str, token: str) -> None:
    refused = socketio.AsyncClient(reconnection=False)
    try:
        await refused.connect(url, transports=TRANSPORTS, wait_timeout=5)
    except socketio.exceptions.ConnectionError as e:
        print("[python] refused without a token:", e, flush=True)
    else:
        raise AssertionError("connected without a token")

    sio = socketio.AsyncClient(reconnection=False)
    got = asyncio.Event()

    @sio.on("apps_list")
    async def apps_list(data):
        got.set()

    await sio.connect(url, auth={"token": token}, transports=TRANSPORTS, wait_timeout=5)
    await asyncio.wait_for(got.wait(), 5)
    print("[python] connected with auth.token and received the state", flush=True)
    await sio.disconnect()
    print("[python] OK", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 30))
    except Exception as e:  # noqa: BLE001
        print(f"[python] FAIL: {e!r}", file=sys.stderr, flush=True)
        sys.exit(1)
