// Two official socket.io-client sockets of one user take the control API's
// commands: one on the websocket transport (node A, our own transport), one
// long-polling (node B). Driven by tests/webhooks.rs, which
// reads one line per step from stdout.
// usage: node sio_control.mjs <nodeAUrl> <nodeBUrl> <token>
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [a, b, token] = process.argv.slice(2);
const fail = (msg) => {
  console.error(`[sio_control] FAIL: ${msg}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 60000).unref();

const opts = { auth: { token }, reconnection: false, timeout: 5000 };
const sockets = [
  io(a, { ...opts, transports: ["websocket"] }),
  io(b, { ...opts, transports: ["polling"], upgrade: false }),
];
const counts = { subscribed: 0, events: 0, unsubscribed: 0 };
const say = (line) => console.log(line);

for (const s of sockets) {
  s.on("subscribed", (ack) => {
    if (ack.topic !== "news.sio" || typeof ack.epoch !== "string" || ack.offset !== 0) {
      fail(`unexpected subscribed ${JSON.stringify(ack)}`);
    }
    if (++counts.subscribed === 2) say("SUBSCRIBED 2");
  });
  s.on("news.sio", (data) => {
    if (data.n !== 7) fail(`unexpected event ${JSON.stringify(data)}`);
    if (++counts.events === 2) say("EVENTS 2");
  });
  s.on("unsubscribed", (u) => {
    if (u.topic !== "news.sio" || u.reason !== "server") fail(`unexpected unsubscribed ${JSON.stringify(u)}`);
    if (++counts.unsubscribed === 2) say("UNSUBSCRIBED 2");
  });
  s.on("error", (e) => console.error("[sio_control] error event", JSON.stringify(e)));
}
sockets.forEach((s, i) => {
  let told = null;
  s.on("server_disconnect", (d) => {
    told = d;
  });
  s.on("disconnect", (reason) => {
    if (!told) fail(`socket ${i} disconnected (${reason}) without server_disconnect first`);
    say(`DISCONNECTED ${i} ${told.code} ${told.reason} ${told.reconnect} ${reason}`);
  });
});

await Promise.all(
  sockets.map(
    (s) =>
      new Promise((resolve, reject) => {
        s.on("connect", resolve);
        s.on("connect_error", reject);
      }),
  ),
).catch((e) => fail(`connect: ${e.message}`));
say(`READY ${sockets[0].id} ${sockets[1].id}`);
