"""python-socketio against a node whose hooks point at the Flask example
back end (examples/flask-backend/app.py): the connect hook admits and
refuses, the subscribe hook decides on room.*, the publish hook replaces
chat.* data, and events with an acknowledgement are RPCs.

usage: python hooks_sio.py <url> <alice-cookie> <mallory-cookie> <carol-cookie> <polling|websocket>
Exits 0 and prints OK when every step held.
"""
import asyncio
import sys

import socketio

URL, ALICE, MALLORY, CAROL, TRANSPORT = sys.argv[1:6]
TRANSPORTS = [TRANSPORT]


def log(*a):
    print(f"[python {TRANSPORT}]", *a, flush=True)


async def refused(headers, expected):
    sio = socketio.AsyncClient(reconnection=False)
    got = asyncio.get_running_loop().create_future()

    @sio.event
    async def connect_error(data):
        if not got.done():
            got.set_result(data)

    try:
        await sio.connect(URL, headers=headers, transports=TRANSPORTS, wait_timeout=5)
    except socketio.exceptions.ConnectionError:
        pass
    else:
        raise AssertionError(f"admitted, expected a refusal with {expected!r}")
    data = await asyncio.wait_for(got, 5)
    message = data.get("message") if isinstance(data, dict) else data
    assert message == expected, f"connect_error {data!r}, expected {expected!r}"
    log("refused:", message)


async def client(cookie, auth=None):
    sio = socketio.AsyncClient(reconnection=False)
    sio.seen = []

    @sio.on("*")
    async def any_event(event, *args):
        sio.seen.append((event, args[0] if args else None))

    await sio.connect(URL, headers={"Cookie": cookie}, auth=auth, transports=TRANSPORTS, wait_timeout=5)
    return sio


async def wait_for(sio, pred, what, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for event, data in sio.seen:
            if pred(event, data):
                return data
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; seen {sio.seen[-5:]!r}")


async def main():
    await refused({}, "not signed in: sign in at /login first")
    await refused({"Cookie": MALLORY}, "mallory is banned")

    connect_data = {"device": "python", "n": [1, 2]}
    alice = await client(ALICE, auth={"data": connect_data})
    sid = alice.get_sid()
    who = await alice.call("whoami", timeout=5)
    assert who["user"] == "alice", who
    assert who["client"] == sid, (who, sid)
    assert who["transport"] == "socketio", who
    assert who["info"] == {"name": "Alice", "connectData": connect_data}, who
    log("admitted as alice with the back end's info; client id = sid", sid)

    ack = await alice.call("subscribe", "room.1", timeout=5)
    assert ack["ok"] is True, ack
    ack = await alice.call("subscribe", "room.2", timeout=5)
    assert ack == {"ok": False, "error": "alice is not a member of room.2", "topic": "room.2"}, ack
    err = await wait_for(alice, lambda e, d: e == "error" and (d or {}).get("topic") == "room.2", "the error event")
    assert err == {"message": "alice is not a member of room.2", "code": "forbidden", "topic": "room.2"}, err
    ack = await alice.call("subscribe", {"topic": "room.2", "data": {"invite": "sesame"}}, timeout=5)
    assert ack["ok"] is True, ack
    log("subscribe hook: room.1 allowed, room.2 refused with its message, allowed with data")

    result = await alice.call("your_action", {"x": 1}, timeout=5)
    assert result["type"] == "action_result", result
    assert result["data"]["echo"] == {"x": 1} and result["data"]["client"] == sid, result
    log("your_action acked with action_result data")

    failed = await alice.call("nope", {"y": 2}, timeout=5)
    assert failed == {"ok": False, "code": "rpc_failed", "error": "unknown method nope"}, failed
    await wait_for(
        alice,
        lambda e, d: e == "error" and isinstance(d, dict) and d.get("event") == "nope",
        "the error event of a failed RPC",
    )
    # Without an acknowledgement: forwarded, a failure comes back as an error event.
    await alice.emit("nope_without_ack", {"z": 3})
    err = await wait_for(
        alice,
        lambda e, d: e == "error" and isinstance(d, dict) and d.get("event") == "nope_without_ack",
        "the error event of an RPC without ack",
    )
    assert err["code"] == "rpc_failed" and err["message"] == "unknown method nope_without_ack", err
    log("failed RPCs: ack {ok: false, code, error} and an error event")

    carol = await client(CAROL)
    for sio in (alice, carol):
        ack = await sio.call("subscribe", "chat.py", timeout=5)
        assert ack["ok"] is True, ack
    ack = await carol.call("publish", {"topic": "chat.py", "data": {"text": "spam!"}}, timeout=5)
    assert ack["ok"] is False and ack["error"] == "no spam, please", ack
    ack = await carol.call("publish", {"topic": "chat.py", "data": {"text": "hi", "x": 1}}, timeout=5)
    assert ack["ok"] is True, ack
    for sio in (alice, carol):
        data = await wait_for(sio, lambda e, d: e == "chat.py", "the chat publication")
        assert data == {"from": "carol", "text": "hi"}, data
    log("publish hook: spam refused, the replacement data reached both subscribers")

    await alice.disconnect()
    await carol.disconnect()
    log("OK")


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    except Exception as e:  # noqa: BLE001
        print(f"[python {TRANSPORT}] FAIL: {e!r}", file=sys.stderr, flush=True)
        sys.exit(1)
