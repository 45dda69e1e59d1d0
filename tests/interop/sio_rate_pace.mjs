// socket.io-client (websocket) against a node whose subscribe hook does not
// answer within PROXY_TIMEOUT_MS (3 s) for sleep.*: the socket subscribes
// to sleep.rate, then emits `unsubscribe` with an ack at <rate> per second
// on its own clock, <emits> times, while the node waits on the hook.
//
// usage: node sio_rate_pace.mjs <url> <rate> <emits> <open|closed>
// `open`: every emit is answered and the socket stays connected (the wait
// is not charged to it). `closed`: it gets the rate limit's `error` and is
// disconnected by the server.
// Exits 0 and prints OK when that held.
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [url, rate, emits, expect] = process.argv.slice(2);
const tag = `[js ${rate}/s ${expect}]`;
const log = (...a) => console.log(tag, ...a);
const fail = (msg) => {
  console.error(`${tag} FAIL: ${msg}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 60000).unref();

const socket = io(url, { transports: ["websocket"], reconnection: false, timeout: 10000 });
await new Promise((resolve, reject) => {
  socket.on("connect", resolve);
  socket.on("connect_error", reject);
});
const errors = [];
socket.on("error", (e) => errors.push(e));
const disconnected = new Promise((resolve) => socket.on("disconnect", resolve));

const n = Number(emits);
let answered = 0;
const subscribed = new Promise((resolve) => socket.emit("subscribe", "sleep.rate", resolve));
const every = 1000 / Number(rate);
const start = performance.now();
for (let i = 1; i <= n; i++) {
  const wait = start + i * every - performance.now();
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  socket.emit("unsubscribe", `t.${i}`, () => answered++);
}

if (expect === "open") {
  const ack = await Promise.race([
    subscribed,
    disconnected.then((why) => fail(`disconnected (${why}); errors ${JSON.stringify(errors)}`)),
  ]);
  if (ack?.ok !== false) fail(`the hook's timeout should refuse the subscribe: ${JSON.stringify(ack)}`);
  const deadline = performance.now() + 10000;
  while (answered < n && socket.connected && performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  if (!socket.connected) fail(`disconnected after ${answered} answers; errors ${JSON.stringify(errors)}`);
  if (answered !== n) fail(`${answered} of ${n} answered`);
  // The refused subscribe's own `error` event is expected; nothing else.
  const others = errors.filter((e) => e?.topic !== "sleep.rate");
  if (others.length) fail(`errors: ${JSON.stringify(others)}`);
  log(`subscribe refused after the hook's timeout (${ack.error}); ${answered} of ${n} answered; still connected`);
  socket.close();
} else {
  const why = await disconnected;
  if (why !== "io server disconnect") fail(`disconnect reason ${why}`);
  if (!errors.some((e) => e?.message === "rate limit exceeded; disconnecting")) {
    fail(`no rate limit error: ${JSON.stringify(errors)}`);
  }
  log(`disconnected by the server after ${answered} of ${n} answers: ${JSON.stringify(errors)}`);
}
console.log("OK");
process.exit(0);
