// Reads presence through the official socket.io-client: `presence` and
// `presence_stats` answered through the acknowledgement, from each node
// given, then watches `presence_diff` after subscribing with the object
// form {topic, presence: true}. Driven by tests/presence.rs: prints one
// `<node index> <event> <ack JSON>` line per answer, then `DIFF <JSON>`
// for each diff seen until one carries its own join (at most 10 s: the
// diffs go out every PRESENCE_DIFF_INTERVAL_MS, later on a loaded
// machine), then OK.
// usage: node sio_presence.mjs <topic> <token> <url>...
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [topic, token, ...urls] = process.argv.slice(2);
const fail = (msg) => {
  console.error(`[sio_presence] FAIL: ${msg}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 30000).unref();

for (const [i, url] of urls.entries()) {
  const s = io(url, { auth: { token }, transports: ["websocket"], reconnection: false, timeout: 5000 });
  await new Promise((resolve, reject) => {
    s.on("connect", resolve);
    s.on("connect_error", reject);
  });
  for (const event of ["presence", "presence_stats"]) {
    const ack = await s.timeout(5000).emitWithAck(event, topic);
    if (!ack.ok) fail(`${event} refused: ${JSON.stringify(ack)}`);
    console.log(`${i} ${event} ${JSON.stringify(ack)}`);
  }
  if (i === urls.length - 1) {
    let ownJoin;
    const seen = new Promise((r) => (ownJoin = r));
    s.on("presence_diff", (d) => {
      console.log(`DIFF ${JSON.stringify(d)}`);
      if (d.joins && d.joins[s.id]) ownJoin();
    });
    const ack = await s.timeout(5000).emitWithAck("subscribe", { topic, presence: true });
    if (!ack.ok) fail(`subscribe refused: ${JSON.stringify(ack)}`);
    await Promise.race([seen, new Promise((r) => setTimeout(r, 10000))]);
  }
  s.disconnect();
}
console.log("OK");
process.exit(0);
