"""Django Channels' group_send through channels_redis's RedisPubSubChannelLayer,
unchanged, for tests/compat.rs.

usage:
  python compat_channels.py <redisUrl> <prefix> send <group> '<message json>'
  python compat_channels.py <redisUrl> <prefix> load <group> <count> <rate>
      group_send(group, {"type": "tick", "seq": i}), <rate> a second
Prints OK at the end.
"""
import asyncio
import json
import sys
import time

from channels_redis.pubsub import RedisPubSubChannelLayer


async def main() -> None:
    url, prefix, mode, group = sys.argv[1:5]
    layer = RedisPubSubChannelLayer(hosts=[url], prefix=prefix)
    if mode == "send":
        await layer.group_send(group, json.loads(sys.argv[5]))
    else:
        count, rate = int(sys.argv[5]), float(sys.argv[6])
        start = time.monotonic()
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await layer.group_send(group, {"type": "tick", "seq": i})
        print(f"sent {count} in {time.monotonic() - start:.2f} s", flush=True)
    await layer.flush()
    print("OK", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
