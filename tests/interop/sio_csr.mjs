// An unchanged socket.io-client app, written as Socket.IO's connection
// state recovery documentation suggests: `io(url)` with the default options
// (long-polling first, then the upgrade to websocket, reconnection on), and
// subscriptions made only when the session was not recovered.
// Driven by tests/socketio_recovery.rs over stdin/stdout.
//
// usage: node sio_csr.mjs <url> <topic>...
// stdout: `OPEN <transport>` when a connection opens (before any upgrade),
//         `CONNECT {"recovered", "transport"}` on every connect,
//         `SUBSCRIBED` once the subscriptions are acknowledged,
//         `GAP {…}` for each gap event, `UPGRADED` once on websocket,
//         `REPORT {"seen": {topic: [n…]}, "gaps": […], "connects": […]}` on a
//         `report` line from stdin; exits on `exit`.
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [url, ...topics] = process.argv.slice(2);
const out = (line) => process.stdout.write(line + "\n");

const socket = io(url);
const seen = Object.fromEntries(topics.map((t) => [t, []]));
const gaps = [];
const connects = [];

// The transport each Engine.IO session opens with (before any upgrade).
// The upgrade listener goes on at open: the upgrade can finish before the
// CONNECT answer is handled, so a listener added on "connect" may miss it.
socket.io.on("open", () => {
  out(`OPEN ${socket.io.engine.transport.name}`);
  socket.io.engine.once("upgrade", () => out("UPGRADED"));
});
socket.on("connect", async () => {
  const transport = socket.io.engine.transport.name;
  connects.push({ recovered: socket.recovered, transport });
  out(`CONNECT ${JSON.stringify({ recovered: socket.recovered, transport })}`);
  if (!socket.recovered) {
    for (const topic of topics) {
      const ack = await socket.timeout(10000).emitWithAck("subscribe", topic);
      if (!ack.ok) out(`ERROR ${JSON.stringify(ack)}`);
    }
    out("SUBSCRIBED");
  }
});
for (const topic of topics) {
  // Publications arrive with the event name of the topic and {n} as data.
  socket.on(topic, (data) => seen[topic].push(data.n));
}
socket.on("gap", (g) => {
  gaps.push(g);
  out(`GAP ${JSON.stringify(g)}`);
});
socket.on("connect_error", (e) => out(`CONNECT_ERROR ${e.message}`));

createInterface({ input: process.stdin }).on("line", (line) => {
  if (line === "report") out(`REPORT ${JSON.stringify({ seen, gaps, connects })}`);
  if (line === "exit") process.exit(0);
});
