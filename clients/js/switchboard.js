// @switchboard/client: the official client of Switchboard's native WebSocket
// protocol (docs/protocol.md). One ES module, no runtime dependencies; runs in
// browsers and in Node 20 (pass `WebSocket` from the `ws` package there).
// With `transports: ["websocket", "sse"]` it falls back to Server-Sent
// Events (`/sse`, over `fetch`) when a WebSocket cannot be opened.
// API and recovery semantics: docs/client.md.

export const VERSION = "0.1.0";

/** Close codes after which the client reconnects (when it did not close itself). */
const RECONNECT_CODES = new Set([1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014]);
/**
 * Codes the application back end closes with (`POST /api/disconnect`):
 * 4000–4499 mean "reconnect", 4500–4999 "do not".
 */
const BACKEND_RECONNECT = [4000, 4499];
const BACKEND_FINAL = [4500, 4999];
/** Close code and reason the server sends when a client token expires. */
const TOKEN_EXPIRED = 3000;
// Refusals of a resubscription that pass: asked again later.
const TRY_AGAIN = new Set(["subscribe_rate_limited", "topic_limit", "unavailable"]);
/** Close code this client uses when it drops a silent or stuck connection. */
const LIVENESS = 4000;

const DEFAULTS = {
  minDelay: 500,
  maxDelay: 30000,
  pingInterval: 25000,
  pingTimeout: 10000,
  connectTimeout: 10000,
  requestTimeout: 10000,
  transports: ["websocket"],
  // How long an SSE stream may carry nothing (no frame, no heartbeat
  // comment) before it counts as dead: two server heartbeats at their
  // default 30 s, and a margin.
  sseSilence: 65000,
};

/** A topic's key in SSE event ids: FNV-1a (32 bits) of its name, base 36. */
export function sseTopicKey(topic) {
  let h = 0x811c9dc5;
  for (const b of new TextEncoder().encode(topic)) {
    h ^= b;
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(36);
}

/**
 * The SSE transport behind the interface the client uses of a WebSocket
 * (`onopen`, `onmessage`, `onclose`, `onerror`, `send`, `close`): the
 * stream's events are native frames already; what the client sends becomes
 * `POST /api/sse/{session}/subscribe|unsubscribe` (topics of the stream's
 * URL were subscribed by opening it); `ping` is answered here while the
 * stream has carried anything (a frame, or the server's heartbeat comment)
 * within the `sseSilence` option's ms; past that the stream is ended as
 * dead (close 4000), so one that went quiet without closing is noticed.
 * Other messages (publish,
 * request, refresh, rpc) get an `error` `unsupported`: SSE is one-way.
 */
class SseSocket {
  constructor(url, { api, topics, token, fetch, silence }) {
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this._api = api;
    this._urlTopics = new Set(topics);
    this._token = token;
    this._fetch = fetch;
    this._abort = new AbortController();
    this._done = false;
    this._end = { code: 1006, reason: "stream ended" };
    this._session = null;
    this._lastData = Date.now();
    this._silence = silence;
    this._run(url);
  }

  async _run(url) {
    let res;
    try {
      const headers = { accept: "text/event-stream" };
      if (this._token) headers.authorization = `Bearer ${this._token}`;
      res = await this._fetch(url, { headers, signal: this._abort.signal });
    } catch (err) {
      return this._finish(1006, String(err?.message ?? err));
    }
    if (res.status !== 200) {
      this.onerror?.({ message: `Unexpected server response: ${res.status}` });
      await res.text().catch(() => "");
      return this._finish(1006, `HTTP ${res.status}`);
    }
    this.onopen?.();
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        this._lastData = Date.now();
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          this._event(block);
        }
      }
    } catch {
      /* aborted or dropped */
    }
    this._finish(this._end.code, this._end.reason);
  }

  _event(block) {
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length === 0) return;
    const text = data.join("\n");
    // Decided by the frame's `type`, never by the SSE event name: a
    // publication's name is its own (a topic may well be called `error`
    // or `reconnect`) and arrives as `type: "event"`.
    let frame = null;
    try {
      frame = JSON.parse(text);
    } catch {
      /* not JSON: passed on, and reported there */
    }
    const type = frame?.type;
    if (type === "connected") {
      this._session = frame.session;
    } else if (type === "reconnect") {
      // The node drains: come back at once (the native 1012).
      this._end = { code: 1012, reason: "server restarting, reconnect" };
      return;
    } else if (type === "error") {
      const code = frame.code;
      if (code === "slow_consumer") this._end = { code: 1013, reason: "slow consumer" };
      if (code === "token_expired") this._end = { code: TOKEN_EXPIRED, reason: "token expired" };
      if (code === "disconnected") this._end = { code: BACKEND_RECONNECT[0], reason: "disconnected" };
    }
    this.onmessage?.({ data: text });
  }

  _finish(code, reason) {
    if (this._done) return;
    this._done = true;
    this.onclose?.({ code, reason });
  }

  _reply(msg) {
    queueMicrotask(() => this.onmessage?.({ data: JSON.stringify(msg) }));
  }

  /** Whether the stream subscribes `topic` for its URL and nobody asked for it since. */
  fromUrl(topic) {
    return this._urlTopics.has(topic);
  }

  send(text) {
    const msg = JSON.parse(text);
    const timestamp = new Date().toISOString();
    switch (msg.type) {
      case "subscribe":
        if (this._urlTopics.delete(msg.event)) return; // the stream's URL asked already
        return void this._post("subscribe", msg.event);
      case "unsubscribe":
        this._urlTopics.delete(msg.event);
        return void this._post("unsubscribe", msg.event);
      case "ping":
        if (Date.now() - this._lastData > this._silence) {
          // Dead: the stream ends here (no pong held back, which would
          // leave the client's ping queue one answer short).
          this._end = { code: LIVENESS, reason: `nothing on the stream for ${this._silence} ms` };
          this._abort.abort();
          return;
        }
        return this._reply({ type: "pong", ...(msg.id === undefined ? {} : { id: msg.id }), timestamp });
      default:
        return this._reply({
          type: "error",
          code: "unsupported",
          error: `"${msg.type}" is not available over SSE (one-way): use a WebSocket or the REST API`,
          event: msg.event,
          replyTo: msg.type,
          // An rpc's refusal finds its call by id.
          ...(msg.id !== undefined ? { id: msg.id } : {}),
          timestamp,
        });
    }
  }

  async _post(op, topic) {
    const headers = { "content-type": "application/json" };
    if (this._token) headers.authorization = `Bearer ${this._token}`;
    let res = null;
    try {
      res = await this._fetch(`${this._api}/${encodeURIComponent(this._session ?? "")}/${op}`, {
        method: "POST",
        headers,
        body: JSON.stringify({ topic }),
      });
      if (res.ok) return;
    } catch {
      /* answered below */
    }
    const body = res ? await res.json().catch(() => null) : null;
    if (op === "subscribe") {
      this._reply({
        type: "error",
        code: body?.code ?? "unavailable",
        error: body?.error ?? "the subscription could not be sent",
        event: topic,
        replyTo: "subscribe",
        timestamp: new Date().toISOString(),
      });
    }
  }

  close() {
    this._done = true;
    this._abort.abort();
  }
}

/** A tiny event emitter: `on`, `off`, `once`. Listener errors never break the client. */
class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return this;
  }

  off(event, fn) {
    const set = this._listeners.get(event);
    if (set) {
      if (!fn) set.clear();
      else if (!set.delete(fn)) {
        for (const f of set) if (f.listener === fn) set.delete(f);
      }
    }
    return this;
  }

  once(event, fn) {
    const wrapper = (arg) => {
      this.off(event, wrapper);
      fn(arg);
    };
    // `off(event, fn)` finds it by the function it was given.
    wrapper.listener = fn;
    return this.on(event, wrapper);
  }

  _emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(arg);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

/**
 * The backoff before reconnect attempt `attempt` (0 for the first): full
 * jitter between `minDelay` and a cap that doubles per attempt up to
 * `maxDelay`, so a crowd of clients cut off together spreads its returns.
 */
export function backoff(attempt, minDelay, maxDelay, random = Math.random) {
  const cap = Math.min(maxDelay, minDelay * 2 ** (attempt + 1));
  return Math.round(minDelay + random() * Math.max(0, cap - minDelay));
}

/** One `subscribe()` call: its handler, its events and the topic's position. */
export class Subscription extends Emitter {
  constructor(client, topic, handler, serverSide = false) {
    super();
    this.client = client;
    this.topic = topic;
    this.handler = handler;
    /** Made by the back end (`POST /api/subscribe`), not by `subscribe()`. */
    this.serverSide = serverSide;
    /** @type {"pending"|"subscribed"|"unsubscribed"} */
    this.state = "pending";
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    // Nobody has to await `ready`.
    this.ready.catch(() => {});
  }

  /** Offset of the last publication seen on the topic (history topics), else null. */
  get offset() {
    return this.client._topics.get(this.topic)?.offset ?? this._lastOffset ?? null;
  }

  /** History epoch of the topic, else null. */
  get epoch() {
    return this.client._topics.get(this.topic)?.epoch ?? this._lastEpoch ?? null;
  }

  unsubscribe() {
    this.client._unsubscribe(this);
  }

  /** Who is on the topic (`PRESENCE_TOPICS`): resolves with `{clientId: {user, info}}`. */
  presence() {
    return this.client.presence(this.topic);
  }

  /** Resolves with `{clients, users}` present on the topic. */
  presenceStats() {
    return this.client.presenceStats(this.topic);
  }
}

/** A client of the native protocol. See docs/client.md. */
export class Switchboard extends Emitter {
  /**
   * @param {string} url `ws(s)://host/ws` (http(s) and, in a browser, relative URLs work too)
   * @param {object} [options]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    /** "websocket" until a WebSocket cannot be opened and `transports` allows "sse". */
    this.transport = this.options.transports[0] ?? "websocket";
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    if (this.transport !== "sse" && typeof this.WebSocket !== "function" && this.options.transports.includes("sse")) {
      this.transport = "sse";
    }
    if (this.transport !== "sse" && typeof this.WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket implementation: pass options.WebSocket (Node 20: the `ws` package)",
      );
    }
    this.token = options.token ?? null;
    /** @type {"idle"|"connecting"|"connected"|"disconnected"|"closed"} */
    this.state = "idle";
    this.clientId = null;
    this._random = options.random ?? Math.random;
    this._socket = null;
    this._attempt = 0;
    this._everConnected = false;
    this._closedByUser = false;
    this._timers = new Set();
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._connectWaiters = [];
    /** topic → {offset, epoch, subs: Set<Subscription>, confirmed, dropping} */
    this._topics = new Map();
    /** compact frames: topic id on this connection → topic */
    this._ids = new Map();
    /** topic → [{kind, resolve, reject, timer}] in the order sent */
    this._pending = new Map();
    this._refreshes = [];
    this._pings = [];
    /** rpc id → {resolve, reject, timer} */
    this._rpcs = new Map();
    this._rpcSeq = 0;
    this._pingSeq = 0;
    /** The number of the newest open (or close): see `_open`. */
    this._openGen = 0;
  }

  // === connection ===

  /** Starts connecting (and reconnecting); resolves once `connected`. */
  connect() {
    this._closedByUser = false;
    const waiter = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this.state === "connected") {
      this._settleConnect(null);
    } else if (this.state !== "connecting" && !this._reconnectTimer) {
      this._attempt = 0;
      this._open();
    }
    return waiter;
  }

  /** Closes for good: no reconnect until `connect()` is called again. */
  close(code = 1000, reason = "") {
    this._closedByUser = true;
    // An open still waiting on getToken/getConnectData is abandoned.
    this._openGen += 1;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const socket = this._socket;
    if (socket) {
      this._teardown(socket);
      try {
        socket.close(code, reason);
      } catch {
        socket.close();
      }
    }
    const wasOpen = this.state === "connected" || this.state === "connecting";
    this._setState("closed");
    // As after any disconnect: the next connect() subscribes every topic
    // again, each unconfirmed, so that its refusals are retried and a topic
    // without history reports what may have been missed.
    this._unconfirmAll();
    this._failPending(new Error("client closed"));
    this._settleConnect(new Error("client closed"));
    if (wasOpen) {
      this._emit("disconnected", { code, reason, byClient: true, willReconnect: false });
    }
  }

  async _open() {
    // Each open has its number: one that a newer open or close() replaced
    // while it awaited the app's callbacks gives up instead of opening a
    // second socket.
    const gen = ++this._openGen;
    this._setState("connecting");
    this._emit("connecting", { attempt: this._attempt });
    let token = this.token;
    if (this.options.getToken) {
      try {
        token = (await this.options.getToken()) ?? null;
      } catch (err) {
        this._emit("error", { code: "token", error: `getToken failed: ${err?.message ?? err}` });
      }
      if (this._closedByUser || gen !== this._openGen) return;
      this.token = token;
    }
    this._lastTokenUsed = token;
    let data = this.options.connectData;
    if (this.options.getConnectData) {
      try {
        data = await this.options.getConnectData();
      } catch (err) {
        this._emit("error", { code: "connect_data", error: `getConnectData failed: ${err?.message ?? err}` });
      }
      if (this._closedByUser || gen !== this._openGen) return;
    }
    let socket;
    try {
      socket =
        this.transport === "sse"
          ? new SseSocket(this._sseUrl(token, data), {
              api: this._sseApi(),
              topics: [...this._topics.keys()],
              token,
              fetch: this._fetch,
              silence: this.options.sseSilence,
            })
          : new this.WebSocket(this._socketUrl(token, data));
    } catch (err) {
      this._settleConnect(err);
      this._setState("closed");
      this._emit("disconnected", { code: 0, reason: String(err?.message ?? err), willReconnect: false });
      return;
    }
    this._socket = socket;
    this._opened = false;
    this._handshakeStatus = null;
    this._connectTimer = setTimeout(
      () => this._drop(socket, LIVENESS, "connect timeout"),
      this.options.connectTimeout,
    );
    socket.onopen = () => {
      this._opened = true;
    };
    socket.onmessage = (ev) => {
      if (this._socket === socket) this._onMessage(ev.data);
    };
    socket.onerror = (ev) => {
      // `ws` says "Unexpected server response: 401"; browsers hide the status.
      const m = /Unexpected server response: (\d+)/.exec(String(ev?.message ?? ev?.error?.message ?? ""));
      if (m) this._handshakeStatus = Number(m[1]);
    };
    socket.onclose = (ev) => {
      if (this._socket !== socket) return;
      this._teardown(socket);
      this._closed(ev.code, ev.reason ?? "");
    };
  }

  _socketUrl(token, data) {
    let base = this.url;
    if (typeof location !== "undefined" && !/^[a-z]+:\/\//i.test(base)) {
      base = new URL(base, location.href).toString();
    }
    const url = new URL(base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    if (token) url.searchParams.set("token", token);
    if (this.options.compact) url.searchParams.set("format", "compact");
    // Connect data for the server's connect hook (docs/backend.md).
    if (data !== undefined && data !== null) url.searchParams.set("data", JSON.stringify(data));
    return url.toString();
  }

  /** The stream's URL: every current topic, and the positions to resume them from. */
  _sseUrl(token, data) {
    const url = new URL(this._ssePath());
    let id = "1";
    for (const [topic, t] of this._topics) {
      url.searchParams.append("topic", topic);
      if (t.epoch != null && t.offset != null) id += `_${sseTopicKey(topic)}.${t.epoch}.${t.offset.toString(36)}`;
    }
    const resuming = this._everConnected;
    // An id, even one without positions ("1", what an EventSource sends
    // back), marks the request as a resume: the server then refuses a
    // topic the token no longer allows alone, not the whole stream.
    if (id !== "1" || resuming) url.searchParams.set("lastEventId", id);
    if (token) url.searchParams.set("token", token);
    if (data !== undefined && data !== null) url.searchParams.set("data", JSON.stringify(data));
    return url.toString();
  }

  _sseApi() {
    // Beside the stream, under the same prefix (a proxy's path included).
    const url = new URL(this._ssePath());
    return `${url.origin}${url.pathname.replace(/\/sse$/, "")}/api/sse`;
  }

  /**
   * Where the stream is: `sseUrl` as given when it ends with `/sse` (else
   * with `/sse` added), or `url` with its `/ws` path turned into `/sse`.
   */
  _ssePath() {
    const url = new URL(this._httpBase());
    const path = url.pathname.replace(/\/$/, "");
    if (this.options.sseUrl != null) url.pathname = path.endsWith("/sse") ? path : `${path}/sse`;
    else url.pathname = path.replace(/\/ws$/, "") + "/sse";
    return url.toString();
  }

  _httpBase() {
    let base = this.options.sseUrl ?? this.url;
    if (typeof location !== "undefined" && !/^[a-z]+:\/\//i.test(base)) {
      base = new URL(base, location.href).toString();
    }
    const url = new URL(base);
    if (url.protocol === "ws:") url.protocol = "http:";
    if (url.protocol === "wss:") url.protocol = "https:";
    url.search = "";
    return url.toString();
  }

  /**
   * Detaches a socket's handlers and timers. `onerror` stays a no-op: Node's
   * `ws` reports a close during the handshake as an `error` event, which
   * with no listener would be thrown and end the app.
   */
  _teardown(socket) {
    socket.onopen = socket.onmessage = socket.onclose = null;
    socket.onerror = () => {};
    if (this._socket === socket) this._socket = null;
    clearTimeout(this._connectTimer);
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  /** Gives up on a silent or stuck socket at once (its close handshake may never end). */
  _drop(socket, code, reason) {
    if (this._socket !== socket) return;
    this._teardown(socket);
    try {
      socket.close(code, reason);
    } catch {
      /* already closing */
    }
    this._closed(code, reason);
  }

  _closed(code, reason) {
    const wasConnected = this.state === "connected";
    this.clientId = null;
    this._failPending(new Error(`disconnected (${code}${reason ? ` ${reason}` : ""})`));
    this._unconfirmAll();
    if (this._closedByUser) return;
    const status = this._opened ? null : this._handshakeStatus;
    const refused = status === 401 || status === 403 || code === TOKEN_EXPIRED;
    if (!this._opened && !refused && this.transport === "websocket" && this.options.transports.includes("sse")) {
      // The WebSocket could not be opened (a proxy that drops upgrades, …):
      // Server-Sent Events from now on, resuming every topic.
      this.transport = "sse";
      this._emit("transport", { transport: "sse" });
      return this._scheduleReconnect({ code, reason, status, wasConnected });
    }
    let retry =
      RECONNECT_CODES.has(code) || code === LIVENESS || (code >= BACKEND_RECONNECT[0] && code <= BACKEND_RECONNECT[1]);
    if (refused || (code >= BACKEND_FINAL[0] && code <= BACKEND_FINAL[1])) retry = false;
    const info = { code, reason, status, wasConnected };
    if (refused && this.options.getToken) {
      // Stop unless getToken() has a token other than the refused one.
      this._setState("disconnected");
      const gen = this._openGen;
      Promise.resolve()
        .then(() => this.options.getToken())
        .then(
          (t) => t ?? null,
          () => null,
        )
        .then((next) => {
          // connect() or close() meanwhile decided instead.
          if (this._closedByUser || gen !== this._openGen) return;
          if (next && next !== this._lastTokenUsed) {
            this.token = next;
            this._scheduleReconnect(info);
          } else {
            this._stop(info);
          }
        });
      return;
    }
    if (retry) this._scheduleReconnect(info);
    else this._stop(info);
  }

  /** No topic is held once the connection is gone. */
  _unconfirmAll() {
    for (const t of this._topics.values()) {
      t.confirmed = false;
      // The reconnect subscribes every topic again: no retry of its own.
      clearTimeout(t.retryTimer);
      t.retryTimer = null;
    }
  }

  _scheduleReconnect(info) {
    const delay = backoff(this._attempt, this.options.minDelay, this.options.maxDelay, this._random);
    this._attempt += 1;
    this._setState("disconnected");
    // Armed before the listeners run: a connect() there waits for it
    // instead of opening a second socket beside it.
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._closedByUser) this._open();
    }, delay);
    this._emit("disconnected", { ...info, willReconnect: true, delay });
  }

  _stop(info) {
    this._setState("closed");
    // Settled before the listeners run: a connect() there starts anew and
    // its promise is not refused with this end.
    this._settleConnect(
      Object.assign(new Error(`connection refused or closed for good (${info.status ?? info.code} ${info.reason})`), info),
    );
    this._emit("disconnected", { ...info, willReconnect: false });
  }

  _setState(state) {
    this.state = state;
  }

  _settleConnect(err) {
    const waiters = this._connectWaiters;
    this._connectWaiters = [];
    for (const w of waiters) (err ? w.reject(err) : w.resolve(this));
  }

  _send(message) {
    if (!this._socket || this.state !== "connected") {
      throw new Error(`not connected (state ${this.state})`);
    }
    this._socket.send(JSON.stringify(message));
  }

  // === liveness ===

  _startLiveness() {
    clearInterval(this._pingTimer);
    const socket = this._socket;
    this._pingTimer = setInterval(() => {
      if (this._socket !== socket || this.state !== "connected") return;
      const sentAt = Date.now();
      // Its pong must not settle one of the app's pings: the server echoes
      // the id (an older one does not, and answers in turn).
      const auto = { auto: true, id: this._nextPingId(), resolve() {}, reject() {} };
      this._pings.push(auto);
      try {
        socket.send(JSON.stringify({ type: "ping", id: auto.id }));
      } catch {
        this._removeOp(null, auto, this._pings);
        return;
      }
      const t = setTimeout(() => {
        this._timers.delete(t);
        if (this._lastSeen < sentAt) {
          this._drop(socket, LIVENESS, `no answer to ping within ${this.options.pingTimeout} ms`);
        }
      }, this.options.pingTimeout);
      this._timers.add(t);
    }, this.options.pingInterval);
  }

  /** Sends `{"type":"ping"}`; resolves with the round-trip time in ms. */
  ping() {
    const start = Date.now();
    const id = this._nextPingId();
    return this._op(null, "ping", () => this._send({ type: "ping", id }), this._pings, { id }).then(
      () => Date.now() - start,
    );
  }

  _nextPingId() {
    this._pingSeq += 1;
    return this._pingSeq;
  }

  // === subscriptions ===

  /**
   * Subscribes to `topic`; `handler(data, meta)` gets every publication.
   * Survives reconnects: the topic is subscribed again with `since`.
   * `options.data` goes to the server's subscribe hook with every
   * (re)subscription of the topic (the first subscription's data counts).
   * `options.presence` (`true` or `{join(clientId, entry), leave(clientId,
   * entry)}`) asks for the topic's `presence_diff`: the handlers get each
   * client that joined or left (`entry` = `{user, info}`), and the
   * subscription emits `presence_diff` with `{joins, leaves}`.
   */
  subscribe(topic, handler = () => {}, options = {}) {
    const sub = new Subscription(this, topic, handler);
    if (options.presence) sub._presence = typeof options.presence === "object" ? options.presence : {};
    let t = this._topics.get(topic);
    if (t && sub._presence && !t.presence) {
      // Asked for now: the server is told by subscribing again, without
      // `since` (the connection holds the topic: nothing was missed).
      t.presence = true;
      if (this.state === "connected") this._sendSubscribe(topic, t, { held: t.confirmed });
    }
    if (!t) {
      t = {
        offset: null,
        epoch: null,
        subs: new Set(),
        confirmed: false,
        recovering: false,
        resubscribing: false,
        data: options.data,
        presence: Boolean(sub._presence),
      };
      this._topics.set(topic, t);
      t.subs.add(sub);
      if (this.state === "connected") this._sendSubscribe(topic, t);
    } else {
      t.subs.add(sub);
      // After subscribe() returned, so that a listener added on the returned
      // subscription sees its `subscribed` too.
      if (t.confirmed) {
        queueMicrotask(() => {
          if (sub.state === "pending") this._confirm(sub, { offset: t.offset, epoch: t.epoch, resubscribed: false });
        });
      }
    }
    return sub;
  }

  _sendSubscribe(topic, t, { held = false } = {}) {
    const msg = { type: "subscribe", event: topic };
    if (t.data !== undefined && t.data !== null) msg.data = t.data;
    if (t.presence) msg.presence = true;
    if (!held) {
      t.recovering = t.epoch != null && t.offset != null;
      if (t.recovering) msg.since = { offset: t.offset, epoch: t.epoch };
    }
    this._pendingPush(topic, { kind: "subscribe" });
    try {
      this._send(msg);
    } catch {
      /* sent again on connect */
    }
  }

  _unsubscribe(sub) {
    const t = this._topics.get(sub.topic);
    if (sub.state === "pending") {
      sub._rejectReady(Object.assign(new Error(`${sub.topic}: unsubscribed before it was subscribed`), { code: "unsubscribed", topic: sub.topic }));
    }
    sub.state = "unsubscribed";
    sub._lastOffset = t?.offset;
    sub._lastEpoch = t?.epoch;
    if (!t || !t.subs.delete(sub) || t.subs.size > 0) return;
    this._topics.delete(sub.topic);
    if (this.state === "connected") {
      try {
        this._send({ type: "unsubscribe", event: sub.topic });
      } catch {
        /* the connection is gone: nothing to undo */
      }
    }
  }

  _confirm(sub, info) {
    const first = sub.state === "pending";
    sub.state = "subscribed";
    sub._emit("subscribed", info);
    if (first) sub._resolveReady(sub);
  }

  // === publish, request, refresh ===

  /** Publishes `data` on `topic` (the token needs a `publish` claim). No acknowledgement. */
  publish(topic, data, { name } = {}) {
    const msg = { type: "publish", event: topic, data: data === undefined ? null : data };
    if (name) msg.name = name;
    this._send(msg);
  }

  /** Who is on `topic`: resolves with `{clientId: {user, info}}` (needs read permission). */
  presence(topic) {
    return this._op(topic, "presence", () => this._send({ type: "presence", event: topic }));
  }

  /** How many clients and users are on `topic`: resolves with `{clients, users}`. */
  presenceStats(topic) {
    return this._op(topic, "presence_stats", () => this._send({ type: "presence_stats", event: topic }));
  }

  /** The topic's current data: resolves with `{data, offset, timestamp}`. */
  request(topic) {
    return this._op(topic, "request", () => this._send({ type: "request", event: topic }));
  }

  /**
   * Calls `method` on the application back end (the server's RPC hook):
   * resolves with the back end's `data`; rejects with an error whose `code`
   * is `rpc_failed` (the back end refused; its numeric code in
   * `backendCode`), `unavailable`, `forbidden` or `bad_message`, or on
   * timeout / disconnect. Calls run concurrently; each answer finds its call
   * by id.
   */
  rpc(method, data = null) {
    return new Promise((resolve, reject) => {
      this._rpcSeq += 1;
      const id = this._rpcSeq;
      const op = { resolve, reject };
      op.timer = setTimeout(() => {
        this._rpcs.delete(id);
        reject(Object.assign(new Error(`rpc ${method}: no answer within ${this.options.requestTimeout} ms`), { code: "timeout" }));
      }, this.options.requestTimeout);
      this._rpcs.set(id, op);
      try {
        this._send({ type: "rpc", id, method, data: data === undefined ? null : data });
      } catch (err) {
        this._rpcs.delete(id);
        clearTimeout(op.timer);
        reject(err);
      }
    });
  }

  /**
   * Sends a new token; resolves with `{expiresAt, applied: "now"}` once the
   * server took it, or at once with `{expiresAt: undefined, applied: "on next
   * connect"}` when not connected (the token is kept for the next connect).
   */
  refresh(token) {
    if (this.state !== "connected") {
      this.token = token;
      return Promise.resolve({ expiresAt: undefined, applied: "on next connect" });
    }
    return this._op(null, "refresh", () => this._send({ type: "refresh", token }), this._refreshes).then(
      (frame) => {
        this.token = token;
        return { expiresAt: frame.expiresAt ?? null, applied: "now" };
      },
    );
  }

  _op(topic, kind, send, queue, extra) {
    return new Promise((resolve, reject) => {
      const op = { kind, resolve, reject, ...extra };
      op.timer = setTimeout(() => {
        this._removeOp(topic, op, queue);
        reject(Object.assign(new Error(`${kind}${topic ? ` ${topic}` : ""}: no answer within ${this.options.requestTimeout} ms`), { code: "timeout", topic }));
      }, this.options.requestTimeout);
      if (queue) queue.push(op);
      else this._pendingPush(topic, op);
      try {
        send();
      } catch (err) {
        this._removeOp(topic, op, queue);
        clearTimeout(op.timer);
        reject(err);
      }
    });
  }

  _pendingPush(topic, op) {
    if (!this._pending.has(topic)) this._pending.set(topic, []);
    this._pending.get(topic).push(op);
  }

  _removeOp(topic, op, queue) {
    const list = queue ?? this._pending.get(topic);
    const i = list ? list.indexOf(op) : -1;
    if (i >= 0) list.splice(i, 1);
  }

  /** Takes the oldest pending operation of `kind` on `topic`. */
  _take(topic, kind) {
    const list = this._pending.get(topic);
    if (!list) return null;
    const i = list.findIndex((op) => op.kind === kind);
    if (i < 0) return null;
    const [op] = list.splice(i, 1);
    if (list.length === 0) this._pending.delete(topic);
    clearTimeout(op.timer);
    return op;
  }

  _failPending(err) {
    for (const [, list] of this._pending) {
      for (const op of list) {
        clearTimeout(op.timer);
        op.reject?.(err);
      }
    }
    this._pending.clear();
    for (const op of this._rpcs.values()) {
      clearTimeout(op.timer);
      op.reject(err);
    }
    this._rpcs.clear();
    for (const queue of [this._refreshes, this._pings]) {
      for (const op of queue.splice(0)) {
        clearTimeout(op.timer);
        op.reject(err);
      }
    }
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
  }

  // === incoming frames ===

  _onMessage(raw) {
    this._lastSeen = Date.now();
    let msg;
    try {
      msg = JSON.parse(typeof raw === "string" ? raw : String(raw));
    } catch {
      return;
    }
    if (Array.isArray(msg)) msg = this._compactEvent(msg);
    this._emit("message", msg);
    switch (msg.type) {
      case "connected":
        return this._onConnected(msg);
      case "subscribed":
        return this._onSubscribed(msg);
      case "unsubscribed":
        return this._onUnsubscribed(msg);
      case "event":
        return this._onEvent(msg);
      case "gap":
        return this._onGap(msg);
      case "response": {
        const op = this._take(msg.event, "request");
        op?.resolve({ data: msg.data, offset: msg.offset ?? null, timestamp: msg.timestamp });
        return;
      }
      case "presence": {
        const op = this._take(msg.event, "presence");
        const t = this._topics.get(msg.event);
        // An app's own read of a watched topic: clients the client did not
        // know of are known from now on (a reset can then tell their leave).
        if (t?.presence && msg.clients && !op?.resync) {
          t.members ??= new Map();
          for (const [id, entry] of Object.entries(msg.clients)) if (!t.members.has(id)) t.members.set(id, entry);
        }
        op?.resolve(msg.clients ?? {});
        return;
      }
      case "presence_stats": {
        const op = this._take(msg.event, "presence_stats");
        op?.resolve({ clients: msg.clients, users: msg.users });
        return;
      }
      case "presence_diff":
        return this._onPresenceDiff(msg);
      case "refreshed": {
        const op = this._refreshes.shift();
        if (op) {
          clearTimeout(op.timer);
          op.resolve(msg);
        }
        this._emit("refreshed", msg);
        return;
      }
      case "rpc_result": {
        const op = this._rpcs.get(msg.id);
        if (op) {
          this._rpcs.delete(msg.id);
          clearTimeout(op.timer);
          op.resolve(msg.data);
        }
        return;
      }
      case "pong": {
        // By id: the pong of a ping that already timed out settles nothing.
        // Without one (an older server), in turn.
        let op;
        if (msg.id === undefined) op = this._pings.shift();
        else {
          const i = this._pings.findIndex((p) => p.id === msg.id);
          if (i >= 0) [op] = this._pings.splice(i, 1);
        }
        if (op && !op.auto) {
          clearTimeout(op.timer);
          op.resolve(msg);
        }
        return;
      }
      case "error":
        return this._onError(msg);
      default:
        return;
    }
  }

  /**
   * A compact event frame (`compact: true`): `[id, data, offset?, name?]`,
   * `id` as the topic's `subscribed` answer on this connection gave it.
   * Read as the default `event` frame, without a timestamp.
   */
  _compactEvent([id, data, ...rest]) {
    const topic = this._ids.get(id);
    const name = rest.find((v) => typeof v === "string");
    const offset = rest.find((v) => typeof v === "number");
    if (topic === undefined) return { type: "compact", id, data };
    return { type: "event", name: name ?? topic, topic, data, offset };
  }

  _onConnected(msg) {
    clearTimeout(this._connectTimer);
    // Topic ids belong to one connection.
    this._ids.clear();
    this.clientId = msg.clientId ?? null;
    const reconnected = this._everConnected;
    this._everConnected = true;
    this._attempt = 0;
    this._setState("connected");
    this._startLiveness();
    this._emit("connected", { clientId: this.clientId, reconnected });
    this._settleConnect(null);
    for (const [topic, t] of this._topics) {
      if (this.state !== "connected") break;
      // Only a topic that was subscribed before can have missed something.
      t.resubscribing = reconnected && t.everConfirmed === true;
      this._sendSubscribe(topic, t);
    }
  }

  _onSubscribed(msg) {
    const topic = msg.event;
    if (typeof msg.id === "number") this._ids.set(msg.id, topic);
    const asked = this._take(topic, "subscribe");
    let t = this._topics.get(topic);
    if (!t) {
      // The answer to our own subscribe of a topic dropped since.
      if (asked) return;
      // A topic of an SSE stream's URL dropped while the stream was
      // opening: the server has it, the app no longer wants it.
      if (this._socket?.fromUrl?.(topic)) {
        try {
          this._send({ type: "unsubscribe", event: topic });
        } catch {
          /* the stream is gone: nothing to undo */
        }
        return;
      }
      t = this._serverSubscription(topic);
    }
    const hasHistory = typeof msg.epoch === "string";
    const previous = { offset: t.offset, epoch: t.epoch };
    const wasRecovering = t.recovering;
    const held = t.confirmed && !wasRecovering;
    t.recovering = false;
    t.confirmed = true;
    const resubscribe = t.resubscribing === true;
    t.resubscribing = false;
    t.everConfirmed = true;
    t.retries = 0;
    clearTimeout(t.retryTimer);
    if (held) {
      // This connection already holds the topic (presence asked for later,
      // the back end subscribing it again): nothing was missed, and the
      // position stays where the events put it (the answer's offset may be
      // ahead of events still on their way).
      const info = { offset: t.offset, epoch: t.epoch, recovered: msg.recovered, resubscribed: false };
      for (const sub of [...t.subs]) if (sub.state === "pending") this._confirm(sub, info);
      return;
    }
    let outcome = null;
    // A pending epoch ("~…": subscribed before the topic's first
    // publication) recovers into the topic's first epoch.
    const continued = msg.epoch === previous.epoch || (previous.epoch?.startsWith("~") ?? false);
    if (wasRecovering && msg.recovered === true && continued) {
      // Missed publications follow as ordinary events; the offset moves with
      // them. `from`..`to`: the offsets replayed, like a gap's (from > to:
      // nothing was missed).
      t.epoch = msg.epoch;
      outcome = ["recovered", { from: previous.offset + 1, to: msg.offset, epoch: msg.epoch }];
    } else {
      if (hasHistory) {
        t.epoch = msg.epoch;
        t.offset = typeof msg.offset === "number" ? msg.offset : null;
      } else {
        t.epoch = null;
        t.offset = null;
      }
      if (resubscribe) {
        const reason = !hasHistory
          ? "the topic keeps no history: publications during the disconnect may be lost"
          : previous.epoch !== msg.epoch && previous.epoch != null
            ? "the topic's history was reset (new epoch)"
            : "the missed publications are no longer in the history";
        outcome = [
          "unrecoverable",
          { reason, previousEpoch: previous.epoch, previousOffset: previous.offset, epoch: t.epoch, offset: t.offset },
        ];
      }
    }
    const info = { offset: t.offset, epoch: t.epoch, recovered: msg.recovered, resubscribed: resubscribe };
    for (const sub of [...t.subs]) {
      this._confirm(sub, info);
      if (outcome) sub._emit(outcome[0], outcome[1]);
    }
    if (outcome) this._emit(outcome[0], { topic, ...outcome[1] });
    if (resubscribe && t.presence && t.members !== undefined) this._resyncPresence(topic, t);
  }

  /**
   * Changes made while this client was away came in no diff: the list,
   * read after the new subscription, tells the handlers who left and who
   * came meanwhile. Diffs that arrive before the answer may be newer than
   * the read: they wait and are applied after the list.
   */
  _resyncPresence(topic, t) {
    t.heldDiffs = [];
    const done = (clients) => {
      if (this._topics.get(topic) !== t) return;
      const held = t.heldDiffs ?? [];
      t.heldDiffs = undefined;
      if (clients) this._onPresenceDiff({ event: topic, joins: clients, leaves: {}, reset: true });
      for (const msg of held) this._onPresenceDiff(msg);
    };
    this._op(topic, "presence", () => this._send({ type: "presence", event: topic }), undefined, { resync: true }).then(
      done,
      () => done(null),
    );
  }

  /**
   * The back end subscribed this connection (`POST /api/subscribe`): the
   * topic becomes a subscription like any other (kept across reconnects,
   * subscribed again with `since`), announced with a `subscription` event.
   */
  _serverSubscription(topic) {
    const sub = new Subscription(this, topic, () => {}, true);
    const t = { offset: null, epoch: null, subs: new Set([sub]), confirmed: false, recovering: false, resubscribing: false };
    this._topics.set(topic, t);
    this._emit("subscription", sub);
    return t;
  }

  _onUnsubscribed(msg) {
    const topic = msg.event;
    const t = this._topics.get(topic);
    // Only a drop the server decided on (a narrower token) reaches this far:
    // our own unsubscribe already forgot the topic.
    if (!t || !msg.reason) return;
    this._topics.delete(topic);
    for (const sub of t.subs) {
      sub.state = "unsubscribed";
      sub._lastOffset = t.offset;
      sub._lastEpoch = t.epoch;
      sub._emit("unsubscribed", { reason: msg.reason });
      sub._rejectReady(new Error(msg.reason));
    }
    this._emit("unsubscribed", { topic, reason: msg.reason });
  }

  _onEvent(msg) {
    const topic = msg.topic ?? msg.name;
    const t = this._topics.get(topic);
    const meta = { name: msg.name, topic, offset: msg.offset ?? null, epoch: t?.epoch ?? null, timestamp: msg.timestamp };
    if (t && typeof msg.offset === "number" && t.epoch != null) {
      // At most once per offset: a replay can overlap with live delivery.
      if (t.offset != null && msg.offset <= t.offset) {
        this._emit("duplicate", meta);
        return;
      }
      t.offset = msg.offset;
    }
    this._emit("event", { ...meta, data: msg.data });
    if (!t) return;
    for (const sub of [...t.subs]) {
      try {
        sub.handler(msg.data, meta);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  _onGap(msg) {
    const topic = msg.event;
    const t = this._topics.get(topic);
    if (!t) return;
    let name;
    let info;
    // Offsets at or below our position in the same epoch are accounted for
    // already: an SSE resume that could not recover says so with
    // `subscribed` (`unrecoverable`) and then with this `gap`.
    if (msg.epoch === t.epoch && t.offset != null && msg.to <= t.offset) return;
    // A pending epoch ("~…", subscribed before the topic's first
    // publication) is continued by the topic's first epoch: a gap in it is a
    // plain gap, not a reset, unless it names a previous epoch (events carry
    // none, so the client's epoch stays pending while it follows the first
    // one, and that one was reset).
    const pending = t.epoch?.startsWith("~") && msg.previousEpoch == null;
    if (t.epoch == null || pending || msg.epoch === t.epoch) {
      // Our position is in this epoch already: offsets from..to of it are lost.
      name = "gap";
      info = { from: msg.from, to: msg.to, epoch: msg.epoch };
      if (msg.previousEpoch != null) info.previousEpoch = msg.previousEpoch;
      t.epoch = msg.epoch ?? t.epoch;
      if (t.offset == null || msg.to > t.offset) t.offset = msg.to;
    } else {
      name = "unrecoverable";
      info = {
        reason: "the topic's history was reset (new epoch)",
        previousEpoch: t.epoch,
        previousOffset: t.offset,
        epoch: msg.epoch,
        offset: msg.to,
        from: msg.from,
        to: msg.to,
      };
      t.epoch = msg.epoch;
      t.offset = msg.to;
    }
    for (const sub of [...t.subs]) sub._emit(name, info);
    this._emit(name, { topic, ...info });
  }

  /**
   * Hands a `presence_diff` to the subscription's handlers. The client
   * keeps who it knows to be present (from diffs and `presence()` answers),
   * so that a `reset` (the whole list, sent after the server may have
   * missed changes, and read by the client itself after its own reconnect)
   * reaches the handlers as the joins and leaves it stands for.
   */
  _onPresenceDiff(msg) {
    const t = this._topics.get(msg.event);
    if (!t) return;
    if (t.heldDiffs) {
      t.heldDiffs.push(msg);
      return;
    }
    const members = (t.members ??= new Map());
    let diff;
    if (msg.reset) {
      const now = msg.joins ?? {};
      diff = { joins: {}, leaves: {} };
      for (const [id, entry] of members) if (!Object.hasOwn(now, id)) diff.leaves[id] = entry;
      for (const [id, entry] of Object.entries(now)) if (!members.has(id)) diff.joins[id] = entry;
    } else {
      // As the server sent it: a join the app already knows from its own
      // presence() read still comes (apps refresh on each diff).
      diff = { joins: msg.joins ?? {}, leaves: msg.leaves ?? {} };
    }
    for (const id of Object.keys(diff.leaves)) members.delete(id);
    for (const [id, entry] of Object.entries(diff.joins)) members.set(id, entry);
    if (msg.reset && Object.keys(diff.joins).length === 0 && Object.keys(diff.leaves).length === 0) return;
    for (const sub of [...t.subs]) {
      if (!sub._presence) continue;
      for (const [id, entry] of Object.entries(diff.leaves)) sub._presence.leave?.(id, entry);
      for (const [id, entry] of Object.entries(diff.joins)) sub._presence.join?.(id, entry);
      sub._emit("presence_diff", diff);
    }
    this._emit("presence_diff", { topic: msg.event, ...diff });
  }

  _onError(msg) {
    const topic = msg.event;
    const code = msg.code;
    const text = String(msg.error ?? "");
    const err = Object.assign(new Error(text || code), { code, topic, frame: msg });
    if (msg.id !== undefined && this._rpcs.has(msg.id)) {
      const op = this._rpcs.get(msg.id);
      this._rpcs.delete(msg.id);
      clearTimeout(op.timer);
      if (msg.backendCode !== undefined) err.backendCode = msg.backendCode;
      op.reject(err);
      return;
    }
    if (code === "token_expired") {
      this._emit("token_expired", msg);
    }
    // What the error answers, from its fields only (never from its text: a
    // topic may be named like any word of a sentence).
    const kind = msg.replyTo ?? this._replyToByCode(topic, code);
    let op = null;
    if (kind === "subscribe" && topic != null) {
      op = this._take(topic, "subscribe");
      const t = this._topics.get(topic);
      if (t && !t.confirmed && t.everConfirmed && TRY_AGAIN.has(code) && this.state === "connected") {
        // A subscription the app already had, refused for now on its way
        // back (a node at a limit, Redis down, many topics at once): asked
        // again later, with its position, instead of lost for good.
        t.retries = (t.retries ?? 0) + 1;
        const delay = backoff(Math.min(t.retries, 6), this.options.minDelay, this.options.maxDelay, this._random);
        clearTimeout(t.retryTimer);
        t.retryTimer = setTimeout(() => {
          if (this._topics.get(topic) === t && !t.confirmed && this.state === "connected") this._sendSubscribe(topic, t);
        }, delay);
      } else if (t && !t.confirmed) {
        // The server did not subscribe us: forget the topic.
        this._topics.delete(topic);
        for (const sub of t.subs) {
          sub.state = "unsubscribed";
          sub._emit("error", err);
          sub._rejectReady(err);
        }
      }
    } else if ((kind === "request" || kind === "presence" || kind === "presence_stats") && topic != null) {
      op = this._take(topic, kind);
      op?.reject(err);
    } else if (kind === "refresh" && this._refreshes.length) {
      op = this._refreshes.shift();
      clearTimeout(op.timer);
      op.reject(err);
    }
    if (!op || op.kind === "subscribe") this._emit("error", err);
  }

  /** For a server without `replyTo`: what the code and the pending calls tell, or null. */
  _replyToByCode(topic, code) {
    if (code === "no_data") return "request";
    if (code === "no_presence") {
      const kinds = (topic == null ? [] : (this._pending.get(topic) ?? [])).map((op) => op.kind);
      return kinds.find((k) => k === "presence" || k === "presence_stats") ?? null;
    }
    if (code === "subscription_limit") return "subscribe";
    if (code === "bad_token") return "refresh";
    const kinds = new Set((topic == null ? [] : (this._pending.get(topic) ?? [])).map((op) => op.kind));
    return kinds.size === 1 ? [...kinds][0] : null;
  }
}

export default Switchboard;
