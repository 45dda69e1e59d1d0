// The live dashboard. It talks only to the node that served it: the native
// protocol through the official client (/assets/switchboard.js) for live
// updates, the REST API for commands and figures. Tokens stay in this tab
// (sessionStorage). See docs/client.md and README.md.

import { Switchboard } from "./switchboard.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEYS = { client: "switchboard.clientToken", api: "switchboard.apiToken", admin: "switchboard.adminToken" };

const page = {
  settings: null,
  state: null,
  client: null,
  everConnected: false,
  inspected: new Map(),
};

function token(kind) {
  return sessionStorage.getItem(TOKEN_KEYS[kind]) || null;
}

function authHeaders(kind) {
  const t = token(kind);
  return t ? { authorization: `Bearer ${t}` } : {};
}

async function api(path, { method = "GET", body, auth } = {}) {
  const headers = { ...(auth ? authHeaders(auth) : {}) };
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const json = await res.json().catch(() => null);
  if (!res.ok || (json && json.success === false)) {
    const err = new Error(json?.error ?? `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return json;
}

// === connection status ===

function setStatus(state, text) {
  const el = $("connection-status");
  el.dataset.state = state;
  el.textContent = text;
}

// === board ===

function renderBoard() {
  const s = page.state;
  if (!s) return;
  $("current-app").textContent = s.current_app;
  $("app-config").textContent = JSON.stringify(s.config ?? s.configs?.[s.current_app] ?? {});
  const apps = $("apps");
  const existing = [...apps.querySelectorAll("button")].map((b) => b.dataset.app);
  if (existing.join() !== s.apps.join()) {
    apps.replaceChildren(
      ...s.apps.map((app) => {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = app;
        b.dataset.app = app;
        b.addEventListener("click", () => command("/api/switch", { app }));
        return b;
      }),
    );
  }
  for (const b of apps.querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(b.dataset.app === s.current_app));
  }
  const slider = $("brightness");
  if (document.activeElement !== slider || !slider.dataset.dragging) slider.value = s.settings.brightness;
  $("brightness-value").textContent = s.settings.brightness;
  const c = s.carousel;
  $("carousel-state").textContent = c.enabled
    ? `on, ${c.apps.map((e) => `${e.app} ${e.duration}s`).join(", ")} (at ${c.current_index})`
    : `off${c.apps.length ? `, ${c.apps.map((e) => `${e.app} ${e.duration}s`).join(", ")}` : ""}`;
  $("carousel-enabled").checked = c.enabled;
  const inCarousel = new Set(c.apps.map((e) => e.app));
  if (c.apps[0]) $("carousel-interval").value = c.apps[0].duration;
  const box = $("carousel-apps");
  if ([...box.querySelectorAll("input")].map((i) => i.value).join() !== s.apps.join()) {
    box.replaceChildren(
      ...s.apps.map((app) => {
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "checkbox";
        input.value = app;
        label.append(input, ` ${app} `);
        label.setAttribute("aria-label", `In carousel: ${app}`);
        return label;
      }),
    );
  }
  for (const i of box.querySelectorAll("input")) i.checked = inCarousel.has(i.value);
}

/** Folds a `device` event into the page's copy (the same rules as the server's cache). */
function absorb(name, data) {
  const s = page.state;
  if (!s || !data) return;
  if (name === "apps_list") {
    if (Array.isArray(data.apps) && data.apps.length) s.apps = data.apps;
    if (data.current) s.current_app = data.current;
  } else if (name === "current_app") {
    s.current_app = data.app;
    s.config = data.config;
    s.configs = { ...s.configs, [data.app]: data.config };
  } else if (name === "settings") {
    s.settings = { brightness: data.brightness };
  } else if (name === "carousel_config") {
    s.carousel = data;
  } else if (name === "app_configs") {
    s.configs = data.configs;
  }
  if (name !== "app_configs") s.config = s.configs?.[s.current_app] ?? s.config;
}

async function reloadState() {
  const { data } = await api("/api/state");
  page.state = data;
  renderBoard();
  refreshFrame();
}

// === the live board ===
// The leader publishes every changed frame on topic `device.frame`
// (docs/protocol.md, "The live frame stream"); the page draws those. A
// frame from an older leader (lower epoch) is ignored. GET /api/frame draws
// the board once at start and after a reconnect (the stream sends nothing
// while the picture stays the same), and every second if the stream is
// refused (a client token that may not read it).

const board = { epoch: 0, streamed: 0, live: false, poll: null };

function showFrame({ width, height, rgb, app, brightness, epoch }) {
  const canvas = $("preview");
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(width, height);
  let lit = 0;
  for (let i = 0; i < width * height; i++) {
    const [r, g, b] = [rgb[i * 3], rgb[i * 3 + 1], rgb[i * 3 + 2]];
    img.data[i * 4] = r;
    img.data[i * 4 + 1] = g;
    img.data[i * 4 + 2] = b;
    img.data[i * 4 + 3] = 255;
    if (r || g || b) lit++;
  }
  ctx.putImageData(img, 0, 0);
  canvas.dataset.app = app;
  canvas.dataset.brightness = brightness;
  $("frame-epoch").textContent = epoch;
  $("lit-pixels").textContent = lit;
}

/** RGB bytes of a stream frame (`runs` or `rgb` encoding), or null if it is not a whole frame. */
function decodeFrame(d) {
  if (!d || d.width !== 64 || d.height !== 32) return null;
  const n = d.width * d.height;
  const rgb = new Uint8ClampedArray(n * 3);
  try {
    if (d.encoding === "rgb") {
      const bin = atob(d.pixels);
      if (bin.length !== n * 3) return null;
      for (let i = 0; i < bin.length; i++) rgb[i] = bin.charCodeAt(i);
      return rgb;
    }
    if (d.encoding !== "runs" || !Array.isArray(d.palette)) return null;
    const palette = d.palette.map((c) => [0, 2, 4].map((k) => parseInt(String(c).substr(k, 2), 16)));
    const runs = atob(d.runs);
    let at = 0;
    for (let i = 0; i + 1 < runs.length; i += 2) {
      const color = palette[runs.charCodeAt(i + 1)];
      const len = runs.charCodeAt(i) + 1;
      if (!color || at + len > n) return null;
      for (let k = 0; k < len; k++, at++) rgb.set(color, at * 3);
    }
    return at === n ? rgb : null;
  } catch {
    return null;
  }
}

function onStreamFrame(d) {
  if (typeof d?.epoch !== "number" || d.epoch < board.epoch) return;
  const rgb = decodeFrame(d);
  if (!rgb) return;
  board.epoch = d.epoch;
  board.streamed++;
  showFrame({ width: d.width, height: d.height, rgb, app: d.app, brightness: d.brightness, epoch: d.epoch });
}

function setFrameSource(live, why) {
  board.live = live;
  $("frame-source").textContent = live ? "live stream" : `polling GET /api/frame (${why})`;
  clearInterval(board.poll);
  board.poll = live ? null : setInterval(() => refreshFrame(), 1000);
}

let frameSeq = 0;
/** Draws GET /api/frame; asks again while the node's copy lags the page's. A stream frame that arrives meanwhile wins. */
async function refreshFrame(tries = 0) {
  const seq = ++frameSeq;
  const streamed = board.streamed;
  let frame;
  try {
    frame = (await api("/api/frame")).data;
  } catch {
    return;
  }
  if (seq !== frameSeq || board.streamed !== streamed) return;
  const s = page.state;
  if (s && tries < 10 && (frame.app !== s.current_app || frame.brightness !== s.settings.brightness)) {
    setTimeout(() => refreshFrame(tries + 1), 50);
    return;
  }
  const rgb = new Uint8ClampedArray(frame.width * frame.height * 3);
  for (let i = 0; i < rgb.length; i++) rgb[i] = parseInt(frame.pixels.substr(i * 2, 2), 16);
  showFrame({ ...frame, rgb });
}

async function command(path, body) {
  const out = $("command-result");
  out.textContent = "";
  try {
    const { data } = await api(path, { method: "POST", body, auth: "api" });
    page.state = data;
    renderBoard();
    if (!board.live) refreshFrame();
  } catch (err) {
    out.textContent = err.status === 401 ? "The API token is missing or wrong: enter it under Tokens." : `Command failed: ${err.message}`;
    if (err.status === 401) showTokens(true);
  }
}

function wireBoard() {
  const slider = $("brightness");
  slider.addEventListener("input", () => {
    slider.dataset.dragging = "1";
    $("brightness-value").textContent = slider.value;
  });
  slider.addEventListener("change", () => {
    delete slider.dataset.dragging;
    command("/api/settings", { brightness: Number(slider.value) });
  });
  $("carousel-enabled").addEventListener("change", (e) => saveCarousel(e.target.checked));
  $("carousel-save").addEventListener("click", () => saveCarousel($("carousel-enabled").checked));
}

function saveCarousel(enabled) {
  const duration = Number($("carousel-interval").value) || 30;
  const apps = [...$("carousel-apps").querySelectorAll("input:checked")].map((i) => ({ app: i.value, duration }));
  const body = { enabled };
  if (apps.length) body.apps = apps;
  else if (enabled && page.state) body.apps = page.state.apps.map((app) => ({ app, duration }));
  command("/api/carousel", body);
}

// === cluster ===

async function refreshCluster() {
  let health;
  try {
    health = await api("/api/health");
  } catch {
    $("readiness").textContent = "unreachable";
    return;
  }
  $("node-id").textContent = health.node;
  $("readiness").textContent = health.status === "ok" ? "ready" : `not ready (${health.reason ?? health.status})`;
  $("backplane").textContent = `${health.backplane}${health.backplaneConnected ? "" : " (disconnected)"}`;
  const nodes = health.nodes ?? [];
  sampleActivity(nodes);
  const body = $("nodes").tBodies[0];
  body.replaceChildren(
    ...nodes.map((n) => {
      const tr = document.createElement("tr");
      tr.dataset.node = n.id;
      const role = n.leader ? "leader" : "follower";
      const rate = activity.last.get(n.id)?.rate;
      for (const v of [n.id + (n.id === health.node ? " (this page)" : ""), role, n.epoch, n.connectedClients, n.topics, n.subscriptions, rate == null ? "–" : rate.toFixed(1), n.version]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.append(td);
      }
      return tr;
    }),
  );
  const s = page.settings;
  if (s?.adminOnThisPort && (!s.adminToken || token("admin"))) {
    try {
      const { data } = await api("/admin/websocket/stats", { auth: "admin" });
      $("cluster-totals").textContent = `${data.nodes.length} node(s), ${data.connectedClients} client connection(s), leader ${data.leader ?? "none"} (epoch ${data.epoch})`;
    } catch {
      $("cluster-totals").textContent = "";
    }
  } else {
    $("cluster-totals").textContent = "";
  }
}

// === activity chart ===
// Deliveries per second and connections per node, from the figures every
// node announces (GET /api/health `nodes`: `delivered` is a running count,
// so two announcements give a rate). The last 60 samples (2 minutes).

const activity = { samples: [], last: new Map(), colors: new Map() };
const SERIES_COLORS = ["#e07a10", "#2a8ad4", "#2aa84a", "#c83ca0", "#8a6ad8", "#c8a800", "#d04040", "#20a8a8"];

function sampleActivity(nodes) {
  const point = { t: Date.now(), nodes: new Map() };
  for (const n of nodes) {
    const at = Date.parse(n.updatedAt) || point.t;
    const prev = activity.last.get(n.id);
    let rate = prev?.rate ?? null;
    if (prev && at > prev.at) rate = Math.max(0, ((n.delivered ?? 0) - prev.delivered) / ((at - prev.at) / 1000));
    if (!prev || at > prev.at) activity.last.set(n.id, { at, delivered: n.delivered ?? 0, rate });
    if (!activity.colors.has(n.id)) activity.colors.set(n.id, SERIES_COLORS[activity.colors.size % SERIES_COLORS.length]);
    point.nodes.set(n.id, { rate, connections: n.connectedClients });
  }
  activity.samples.push(point);
  if (activity.samples.length > 60) activity.samples.shift();
  drawActivity();
  $("chart").dataset.samples = activity.samples.length;
  $("chart-now").textContent = nodes.length
    ? `Now: ${nodes.map((n) => {
        const v = point.nodes.get(n.id);
        return `${n.id} ${v.rate == null ? "–" : v.rate.toFixed(1)} deliveries/s, ${v.connections} connection(s)`;
      }).join("; ")}`
    : "No node figures yet.";
}

function drawActivity() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const dark = matchMedia("(prefers-color-scheme: dark)").matches;
  const ink = dark ? "#ddd" : "#222";
  const grid = dark ? "#555" : "#ccc";
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  const legendH = 18;
  const panelH = (H - legendH) / 2;
  const panels = [
    { title: "deliveries/s", value: (v) => v.rate },
    { title: "connections", value: (v) => v.connections },
  ];
  const ids = [...activity.colors.keys()];
  panels.forEach((panel, p) => {
    const top = p * panelH;
    const left = 44;
    const right = W - 8;
    const bottom = top + panelH - 8;
    const plotTop = top + 18;
    let max = 1;
    for (const s of activity.samples) for (const v of s.nodes.values()) max = Math.max(max, panel.value(v) ?? 0);
    max = niceCeil(max);
    ctx.fillStyle = ink;
    ctx.fillText(panel.title, left, top + 12);
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(left, plotTop);
    ctx.lineTo(left, bottom);
    ctx.lineTo(right, bottom);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(String(max), left - 4, plotTop + 8);
    ctx.fillText("0", left - 4, bottom);
    ctx.textAlign = "left";
    const x = (i) => left + ((right - left) * i) / 59;
    const y = (v) => bottom - ((bottom - plotTop) * v) / max;
    for (const id of ids) {
      ctx.strokeStyle = activity.colors.get(id);
      ctx.lineWidth = 2;
      ctx.beginPath();
      let drawing = false;
      activity.samples.forEach((s, i) => {
        const v = s.nodes.get(id);
        const value = v ? panel.value(v) : null;
        if (value == null) {
          drawing = false;
          return;
        }
        const px = x(i + 60 - activity.samples.length);
        if (drawing) ctx.lineTo(px, y(value));
        else ctx.moveTo(px, y(value));
        drawing = true;
      });
      ctx.stroke();
    }
  });
  let lx = 44;
  for (const id of ids) {
    ctx.fillStyle = activity.colors.get(id);
    ctx.fillRect(lx, H - 12, 10, 10);
    ctx.fillStyle = ink;
    ctx.fillText(id, lx + 14, H - 3);
    lx += ctx.measureText(id).width + 30;
  }
}

/** 1, 2, 5 × 10^n at or above `v`. */
function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((c) => c >= v);
}

// === topic inspector ===

function log(topic, kind, text) {
  const li = document.createElement("li");
  li.dataset.topic = topic;
  li.dataset.kind = kind;
  if (kind !== "event") li.className = "mark";
  li.textContent = `${new Date().toLocaleTimeString()} ${topic} ${text}`;
  const list = $("inspector-log");
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

/** Whether `topic` keeps presence on this node (`PRESENCE_TOPICS`, `*` wildcards). */
function presenceKept(topic) {
  const escape = (part) => part.replace(/[.+?^${}()|[\]\\/]/g, "\\$&");
  return (page.settings.presenceTopics ?? []).some((p) => new RegExp("^" + p.split("*").map(escape).join(".*") + "$").test(topic));
}

/** Topics with at most this many clients show who they are. */
const SMALL_TOPIC = 20;

/** Shows an inspected topic's clients and users, and who they are when few. */
async function showPresence(topic) {
  const entry = page.inspected.get(topic);
  if (!entry || entry.reading) {
    if (entry) entry.again = true;
    return;
  }
  entry.reading = true;
  try {
    const stats = await entry.sub.presenceStats();
    entry.counts.textContent = `${stats.clients} ${stats.clients === 1 ? "client" : "clients"} · ${stats.users} ${stats.users === 1 ? "user" : "users"}`;
    entry.li.dataset.clients = String(stats.clients);
    entry.li.dataset.users = String(stats.users);
    const items = [];
    if (stats.clients <= SMALL_TOPIC) {
      const who = await entry.sub.presence();
      for (const [id, e] of Object.entries(who).sort(([a], [b]) => a.localeCompare(b))) {
        const li = document.createElement("li");
        li.dataset.client = id;
        const info = e.info == null ? "" : ` ${JSON.stringify(e.info)}`;
        li.textContent = `${e.user || "anonymous"} · ${id}${id === page.client.clientId ? " (this page)" : ""}${info}`;
        items.push(li);
      }
    }
    entry.who.replaceChildren(...items);
  } catch (e) {
    entry.counts.textContent = `presence unavailable: ${e.message}`;
  } finally {
    entry.reading = false;
    if (entry.again) {
      entry.again = false;
      showPresence(topic);
    }
  }
}

function inspect(topic) {
  if (page.inspected.has(topic)) return;
  const presence = presenceKept(topic);
  const sub = page.client.subscribe(
    topic,
    (data, meta) => {
      const offset = meta.offset == null ? "" : ` #${meta.offset}`;
      log(topic, "event", `${meta.name}${offset} ${JSON.stringify(data)}`);
    },
    presence ? { presence: true } : {},
  );
  sub.on("subscribed", (i) => log(topic, "subscribed", `subscribed${i.epoch ? ` at #${i.offset} (epoch ${i.epoch})` : ""}`));
  sub.on("recovered", (r) => log(topic, "recovered", `recovered ${r.from}..${r.to}`));
  sub.on("gap", (g) => log(topic, "gap", `gap: ${g.from}..${g.to} lost`));
  sub.on("unrecoverable", (u) => log(topic, "unrecoverable", `unrecoverable: ${u.reason}`));
  sub.on("unsubscribed", (u) => {
    log(topic, "unsubscribed", `unsubscribed by the server: ${u.reason}`);
    drop(topic);
  });
  sub.on("error", (e) => {
    log(topic, "error", `refused: ${e.message}`);
    drop(topic);
  });
  const li = document.createElement("li");
  li.dataset.topic = topic;
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = "Unsubscribe";
  b.setAttribute("aria-label", `Unsubscribe from ${topic}`);
  b.addEventListener("click", () => {
    sub.unsubscribe();
    drop(topic);
  });
  const counts = document.createElement("span");
  counts.className = "presence-counts";
  const who = document.createElement("ul");
  who.className = "presence-who";
  who.setAttribute("aria-label", `Who is on ${topic}`);
  li.append(topic, " ", counts, b, who);
  $("inspected-topics").append(li);
  page.inspected.set(topic, { sub, li, counts, who });
  if (presence) {
    sub.on("subscribed", () => showPresence(topic));
    sub.on("presence_diff", () => showPresence(topic));
  }
}

function drop(topic) {
  const entry = page.inspected.get(topic);
  if (!entry) return;
  entry.li.remove();
  page.inspected.delete(topic);
}

function wireInspector() {
  $("subscribe-form").addEventListener("submit", (e) => {
    e.preventDefault();
    inspect($("inspect-topic").value.trim());
  });
  $("publish-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = $("publish-result");
    let data;
    try {
      data = JSON.parse($("publish-data").value);
    } catch (err) {
      out.textContent = `Data is not JSON: ${err.message}`;
      return;
    }
    const body = { topic: $("publish-topic").value.trim(), data };
    const event = $("publish-event").value.trim();
    if (event) body.event = event;
    try {
      const r = await api("/api/publish", { method: "POST", body, auth: "api" });
      out.textContent = `accepted${r.data.offset != null ? ` as #${r.data.offset} (epoch ${r.data.epoch})` : ""}`;
    } catch (err) {
      out.textContent = `refused: ${err.message}`;
      if (err.status === 401) showTokens(true);
    }
  });
}

// === tokens ===

function showTokens(force = false) {
  const s = page.settings;
  const need = { client: s.clientToken, api: s.apiToken, admin: s.adminToken && s.adminOnThisPort };
  $("client-token-row").hidden = !need.client;
  $("api-token-row").hidden = !need.api;
  $("admin-token-row").hidden = !need.admin;
  $("tokens").hidden = !(force || need.client || need.api || need.admin);
}

function wireTokens() {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    for (const [kind, id] of [["client", "client-token"], ["api", "api-token"], ["admin", "admin-token"]]) {
      const v = $(id).value.trim();
      if (v) sessionStorage.setItem(TOKEN_KEYS[kind], v);
      $(id).value = "";
    }
    if (page.client) {
      page.client.close();
      page.client.connect().catch(() => {});
    }
    refreshCluster();
  });
}

// === start ===

async function main() {
  wireBoard();
  wireInspector();
  wireTokens();
  page.settings = (await api("/api/dashboard")).data;
  $("node-id").textContent = page.settings.node;
  showTokens();
  if (!page.settings.websocketPath) {
    setStatus("stopped", "WebSocket endpoint disabled on this node");
    setFrameSource(false, "WebSocket endpoint disabled");
  } else {
    const client = new Switchboard(page.settings.websocketPath, {
      getToken: () => token("client"),
      minDelay: 250,
      maxDelay: 5000,
      pingInterval: 10000,
      pingTimeout: 5000,
    });
    page.client = client;
    window.switchboard = client;
    client.on("connecting", () => {
      if (page.everConnected) setStatus("reconnecting", "reconnecting…");
      else setStatus("connecting", "connecting…");
    });
    client.on("connected", ({ clientId, reconnected }) => {
      page.everConnected = true;
      $("client-id").textContent = clientId;
      if (reconnected) {
        setStatus("recovered", "recovered: live again");
        reloadState();
        refreshCluster();
      } else {
        setStatus("live", "live");
      }
    });
    client.on("disconnected", (d) => {
      $("client-id").textContent = "–";
      if (d.willReconnect) setStatus("reconnecting", `reconnecting… (${d.code}${d.reason ? ` ${d.reason}` : ""})`);
      else if (!d.byClient) {
        setStatus("stopped", `disconnected (${d.status ?? d.code}${d.reason ? ` ${d.reason}` : ""}); check the client token`);
        showTokens(true);
      }
    });
    const device = client.subscribe("device", (data, meta) => {
      absorb(meta.name, data);
      renderBoard();
      if (!board.live) refreshFrame();
    });
    device.on("unrecoverable", () => reloadState());
    const stream = client.subscribe("device.frame", (data) => onStreamFrame(data));
    stream.on("subscribed", () => setFrameSource(true));
    stream.on("error", (e) => setFrameSource(false, `stream refused: ${e.message}`));
    stream.on("unsubscribed", (u) => setFrameSource(false, u.reason));
    client.connect().catch(() => {});
  }
  await reloadState();
  await refreshCluster();
  setInterval(refreshCluster, 2000);
}

main().catch((err) => {
  setStatus("stopped", `dashboard failed to start: ${err.message}`);
});
