"""An httpx streaming client resumes an SSE stream on another node.

Usage: sse_resume.py <node B addr> <last event id from node A> <node A addr>

Node A's stream received r1 and r2 publications 1..5 before it was
closed; 6..9 of each were published since. Reconnecting to node B with
Last-Event-ID must give exactly 6..9 of each topic, then live ones. Then,
with 60 more publications than the nodes' HISTORY_SIZE=50 keeps, the same
id gets a `gap` for r1, then live.
"""

import json
import sys

import httpx

b, last_id, a = sys.argv[1], sys.argv[2], sys.argv[3]


def events(response):
    event, data = None, []
    for line in response.iter_lines():
        if line == "":
            if event is not None:
                yield event, json.loads("".join(data))
            event, data = None, []
        elif line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])


got = {"r1": [], "r2": []}
with httpx.Client(timeout=10) as client:
    with client.stream(
        "GET",
        f"http://{b}/sse?topic=r1&topic=r2",
        headers={"Last-Event-ID": last_id},
    ) as response:
        assert response.status_code == 200, response.status_code
        assert response.headers["content-type"].startswith("text/event-stream")
        published = False
        for event, data in events(response):
            if event == "subscribed":
                assert data.get("recovered") is True, (last_id, data)
            elif event in got:
                got[event].append(data["data"]["n"])
            elif event == "gap":
                raise SystemExit(f"unexpected gap: {data}")
            if not published and all(len(v) == 4 for v in got.values()):
                assert got == {"r1": [6, 7, 8, 9], "r2": [6, 7, 8, 9]}, got
                for topic in ("r1", "r2"):
                    client.post(
                        f"http://{a}/api/publish",
                        json={"topic": topic, "data": {"n": 10}},
                    ).raise_for_status()
                published = True
            if all(len(v) == 5 for v in got.values()):
                break
assert got == {"r1": [6, 7, 8, 9, 10], "r2": [6, 7, 8, 9, 10]}, got

with httpx.Client(timeout=10) as client:
    for n in range(60):
        client.post(
            f"http://{a}/api/publish", json={"topic": "r1", "data": {"n": 100 + n}}
        ).raise_for_status()
    with client.stream(
        "GET", f"http://{b}/sse?topic=r1", headers={"Last-Event-ID": last_id}
    ) as response:
        seen = []
        for event, data in events(response):
            seen.append(event)
            if event == "subscribed":
                assert data["recovered"] is False, data
                client.post(
                    f"http://{a}/api/publish", json={"topic": "r1", "data": {"n": 1000}}
                ).raise_for_status()
            elif event == "gap":
                # Offsets 6..70 (10 + 60): since-recovery is all or nothing.
                assert (data["event"], data["from"], data["to"]) == ("r1", 6, 70), data
            elif event == "r1":
                assert data["data"]["n"] == 1000, data
                break
        assert seen == ["connected", "subscribed", "gap", "r1"], seen
print("OK", got, "then a gap")
