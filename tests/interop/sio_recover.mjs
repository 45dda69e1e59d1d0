// socket.io-client recovers missed publications of a history topic.
// usage: node sio_recover.mjs <nodeA> <nodeB> <redisPort> <prefix>
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [a, b] = process.argv.slice(2);
const log = (...m) => console.log("[js recover]", ...m);
const fail = (msg) => { console.error(`[js recover] FAIL: ${msg}`); process.exit(1); };
setTimeout(() => fail("scenario timed out"), 30000).unref();

async function publish(n) {
  const r = await fetch(b + "/api/publish", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ topic: "news", data: { n } }) });
  if (r.status !== 202) fail(`publish ${r.status}`);
  return (await r.json()).data;
}
const until = async (pred, ms, what) => {
  const end = Date.now() + ms;
  while (!pred()) { if (Date.now() > end) fail(`timeout: ${what}`); await new Promise((r) => setTimeout(r, 10)); }
};
const connect = async (url) => {
  const s = io(url, { transports: ["websocket"], reconnection: false });
  await new Promise((res, rej) => { s.on("connect", res); s.on("connect_error", rej); });
  return s;
};

try {
  let received = [];
  let s = await connect(a);
  s.on("news", (data, pos) => received.push({ n: data.n, offset: pos.offset }));
  const ack = await s.timeout(5000).emitWithAck("subscribe", { topic: "news" });
  if (!ack.ok || typeof ack.epoch !== "string") fail(`ack ${JSON.stringify(ack)}`);
  const first = await publish(1);
  await until(() => received.length === 1, 3000, "first event");
  if (received[0].offset !== first.offset) fail(`offset ${JSON.stringify(received)}`);
  const last = first.offset;
  s.disconnect();
  for (let n = 2; n <= 11; n++) await publish(n);

  received = [];
  s = await connect(b);
  s.on("news", (data, pos) => received.push({ n: data.n, offset: pos.offset }));
  const rec = await s.timeout(5000).emitWithAck("subscribe", { topic: "news", offset: last, epoch: ack.epoch });
  if (!rec.ok || rec.recovered !== true) fail(`recover ack ${JSON.stringify(rec)}`);
  await publish(12);
  await until(() => received.length >= 11, 5000, "recovered events");
  const offsets = received.map((r) => r.offset);
  for (let i = 0; i < 11; i++) if (offsets[i] !== last + 1 + i) fail(`offsets ${offsets}`);
  if (received.map((r) => r.n).join() !== "2,3,4,5,6,7,8,9,10,11,12") fail(`data ${JSON.stringify(received)}`);
  log("recovered 10 missed publications in order, then live");
  s.disconnect();
  log("OK");
  process.exit(0);
} catch (e) {
  fail(e.stack || String(e));
}
