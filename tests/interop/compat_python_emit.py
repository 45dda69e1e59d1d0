"""python-socketio's own external emitter, unchanged, for tests/compat.rs.

usage:
  python compat_python_emit.py <redisUrl> <channel> steps '<json list>'
      each step: ["emit", event, data, {"room"?, "skip_sid"?}],
                 ["emit_args", event, [args...], {...}] (several arguments),
                 ["enter_room", sid, room], ["leave_room", sid, room],
                 ["sleep", seconds]
  python compat_python_emit.py <redisUrl> <channel> load <room> <count> <rate>
      emits event "tick" with {"seq": i} to <room>, <rate> a second
Prints OK at the end.
"""
import json
import sys
import time

import socketio


def main() -> None:
    url, channel, mode = sys.argv[1:4]
    mgr = socketio.RedisManager(url, channel=channel, write_only=True)
    if mode == "steps":
        for step in json.loads(sys.argv[4]):
            if step[0] == "emit":
                _, event, data, opts = step
                mgr.emit(event, data, namespace="/", **opts)
            elif step[0] == "emit_args":
                _, event, args, opts = step
                mgr.emit(event, tuple(args), namespace="/", **opts)
            elif step[0] == "enter_room":
                mgr.enter_room(step[1], "/", step[2])
            elif step[0] == "leave_room":
                mgr.leave_room(step[1], "/", step[2])
            elif step[0] == "sleep":
                time.sleep(step[1])
    else:
        room, count, rate = sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
        start = time.monotonic()
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            mgr.emit("tick", {"seq": i}, room=room)
        print(f"sent {count} in {time.monotonic() - start:.2f} s", flush=True)
    print("OK", flush=True)


if __name__ == "__main__":
    main()
