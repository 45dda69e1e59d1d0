// An official socket.io-client app, unchanged, for tests/compat.rs: it
// connects, subscribes to the rooms given, prints `READY <socket.id>`, then
// records every event (the four device state events aside) until `done`
// and prints them as `EVENTS <json>` and `OK`.
// usage: node compat_client.mjs <nodeUrl> <rooms, comma-separated or "-">
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [url, roomList] = process.argv.slice(2);
const rooms = roomList === "-" ? [] : roomList.split(",");
const STATE = new Set(["apps_list", "current_app", "settings", "carousel_config", "subscribed"]);
const fail = (msg) => { console.error(`[js] FAIL: ${msg}`); process.exit(1); };
setTimeout(() => fail("no done event within 60 s"), 60000).unref();

const socket = io(url, { transports: ["websocket"], reconnection: false, timeout: 5000 });
const events = [];
socket.onAny((event, ...args) => {
  if (STATE.has(event)) return;
  events.push([event, ...args]);
  if (event === "done") {
    console.log("EVENTS " + JSON.stringify(events));
    console.log("OK");
    process.exit(0);
  }
});
socket.on("connect_error", (e) => fail(`connect_error ${e.message}`));
socket.on("connect", async () => {
  for (const room of rooms) {
    const ack = await socket.timeout(5000).emitWithAck("subscribe", room);
    if (!ack.ok) fail(`subscribe ${room}: ${JSON.stringify(ack)}`);
  }
  console.log(`READY ${socket.id}`);
});
