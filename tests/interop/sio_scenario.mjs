// Drives the official socket.io-client against two Switchboard nodes.
// usage: node sio_scenario.mjs <transport: polling|websocket> <clientNodeUrl> <otherNodeUrl>
// Exits 0 when every step held; prints what it checked.
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [transport, here, there] = process.argv.slice(2);
const STATE_EVENTS = ["apps_list", "current_app", "settings", "carousel_config"];
const log = (...a) => console.log(`[js ${transport}]`, ...a);
const fail = (msg) => { console.error(`[js ${transport}] FAIL: ${msg}`); process.exit(1); };
setTimeout(() => fail("scenario timed out"), 30000).unref();

const socket = io(here, { transports: [transport], upgrade: false, reconnection: false, timeout: 5000 });
const seen = [];
socket.onAny((event, data) => seen.push({ event, data, at: Date.now() }));

function waitFor(pred, ms, what) {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const t = setInterval(() => {
      const hit = seen.find(pred);
      if (hit) { clearInterval(t); resolve(hit); }
      else if (Date.now() - start > ms) { clearInterval(t); reject(new Error(`timeout waiting for ${what}`)); }
    }, 10);
  });
}
async function post(path, body) {
  const r = await fetch(there + path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return { status: r.status, body: await r.json() };
}

try {
  await new Promise((res, rej) => { socket.on("connect", res); socket.on("connect_error", rej); });
  log("connected", socket.id, "via", socket.io.engine.transport.name);
  if (socket.io.engine.transport.name !== transport) fail(`transport is ${socket.io.engine.transport.name}`);
  for (const ev of STATE_EVENTS) await waitFor((s) => s.event === ev, 5000, ev);
  log("received the four state events on connect");

  seen.length = 0;
  socket.emit("request_state");
  for (const ev of STATE_EVENTS) await waitFor((s) => s.event === ev, 5000, `${ev} after request_state`);
  log("request_state answered");

  const app = transport === "polling" ? "scroll_text" : "stars";
  seen.length = 0;
  const sent = Date.now();
  const r = await post("/api/switch", { app });
  if (r.status !== 200) fail(`switch answered ${r.status} ${JSON.stringify(r.body)}`);
  const hit = await waitFor((s) => s.event === "current_app" && s.data.app === app, 1000, `current_app ${app} within 1 s`);
  log(`current_app ${app} arrived ${hit.at - sent} ms after the command on the other node`);

  const bad = await post("/api/settings", { brightness: 150 });
  if (bad.status !== 400 || !String(bad.body.error).includes("brightness")) fail(`bad brightness answered ${bad.status} ${JSON.stringify(bad.body)}`);
  log("brightness 150 refused:", bad.body.error);

  const ack = await socket.timeout(5000).emitWithAck("subscribe", "news");
  if (!ack.ok) fail(`subscribe ack ${JSON.stringify(ack)}`);
  const pub = await post("/api/publish", { topic: "news", data: { n: 7 } });
  if (pub.status !== 202) fail(`publish answered ${pub.status}`);
  const news = await waitFor((s) => s.event === "news", 3000, "news event");
  if (news.data.n !== 7) fail(`news data ${JSON.stringify(news.data)}`);
  log("subscribe + cross-node publish delivered");

  const nack = await socket.timeout(5000).emitWithAck("subscribe", "no spaces allowed");
  if (nack.ok !== false || !String(nack.error).includes("invalid topic")) fail(`bad subscribe ack ${JSON.stringify(nack)}`);
  const err = await waitFor((s) => s.event === "error", 3000, "error event");
  if (err.data?.code !== "bad_topic" || !String(err.data?.message).includes("invalid topic")) {
    fail(`bad error event ${JSON.stringify(err.data)}`);
  }
  log("invalid topic refused with ack and error event (code bad_topic)");

  socket.disconnect();
  log("OK");
  process.exit(0);
} catch (e) {
  fail(e.message);
}
