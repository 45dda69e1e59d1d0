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

let frameSeq = 0;
/** Redraws the preview from GET /api/frame; asks again while the node's copy lags the page's. */
async function refreshFrame(tries = 0) {
  const seq = ++frameSeq;
  let frame;
  try {
    frame = (await api("/api/frame")).data;
  } catch {
    return;
  }
  if (seq !== frameSeq) return;
  const s = page.state;
  if (s && tries < 10 && (frame.app !== s.current_app || frame.brightness !== s.settings.brightness)) {
    setTimeout(() => refreshFrame(tries + 1), 50);
    return;
  }
  const canvas = $("preview");
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(frame.width, frame.height);
  for (let i = 0; i < frame.width * frame.height; i++) {
    for (let k = 0; k < 3; k++) img.data[i * 4 + k] = parseInt(frame.pixels.substr(i * 6 + k * 2, 2), 16);
    img.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  canvas.dataset.app = frame.app;
  canvas.dataset.brightness = frame.brightness;
  $("frame-epoch").textContent = frame.epoch;
  $("lit-pixels").textContent = frame.litPixels;
}

async function command(path, body) {
  const out = $("command-result");
  out.textContent = "";
  try {
    const { data } = await api(path, { method: "POST", body, auth: "api" });
    page.state = data;
    renderBoard();
    refreshFrame();
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
  const body = $("nodes").tBodies[0];
  body.replaceChildren(
    ...nodes.map((n) => {
      const tr = document.createElement("tr");
      tr.dataset.node = n.id;
      const role = n.leader ? "leader" : "follower";
      for (const v of [n.id + (n.id === health.node ? " (this page)" : ""), role, n.epoch, n.connectedClients, n.topics, n.subscriptions, n.version]) {
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

function inspect(topic) {
  if (page.inspected.has(topic)) return;
  const sub = page.client.subscribe(topic, (data, meta) => {
    const offset = meta.offset == null ? "" : ` #${meta.offset}`;
    log(topic, "event", `${meta.name}${offset} ${JSON.stringify(data)}`);
  });
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
  li.append(topic, b);
  $("inspected-topics").append(li);
  page.inspected.set(topic, { sub, li });
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
      refreshFrame();
    });
    device.on("unrecoverable", () => reloadState());
    client.connect().catch(() => {});
  }
  await reloadState();
  await refreshCluster();
  setInterval(refreshCluster, 2000);
}

main().catch((err) => {
  setStatus("stopped", `dashboard failed to start: ${err.message}`);
});
