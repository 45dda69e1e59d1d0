// Type declarations of @switchboard/client (switchboard.js). See docs/client.md.

export declare const VERSION: string;

/** Delay in ms before reconnect attempt `attempt` (0-based): full jitter in [minDelay, min(maxDelay, minDelay·2^(attempt+1))]. */
export declare function backoff(
  attempt: number,
  minDelay: number,
  maxDelay: number,
  random?: () => number,
): number;

export type ConnectionState = "idle" | "connecting" | "connected" | "disconnected" | "closed";

export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export interface SwitchboardOptions {
  /** WebSocket constructor; required in Node 20 (e.g. `import WebSocket from "ws"`). Default: globalThis.WebSocket. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** A fixed client token (sent as the `token` query parameter). */
  token?: string | null;
  /** Called before every (re)connect; its token wins over `token`. After a token refusal the client reconnects only when this returns a different token. */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Connect data for the server's connect hook, sent as `?data=<URL-encoded JSON>` (docs/backend.md). */
  connectData?: any;
  /** Called before every (re)connect; its value wins over `connectData`. */
  getConnectData?: () => any | Promise<any>;
  /** Backoff floor in ms (default 500). */
  minDelay?: number;
  /** Backoff ceiling in ms (default 30000). */
  maxDelay?: number;
  /** ms between client `ping` messages (default 25000). */
  pingInterval?: number;
  /** A connection silent this long after a ping is dropped and reconnected (default 10000). */
  pingTimeout?: number;
  /** A socket that is not `connected` within this is dropped (default 10000). */
  connectTimeout?: number;
  /** `request`, `refresh`, `ping` and `rpc` reject after this (default 10000). */
  requestTimeout?: number;
  /** Ask for compact event frames (`?format=compact`, about half the bytes); events then have no `timestamp`. Default false. */
  compact?: boolean;
  /** Random source for the jitter (tests). */
  random?: () => number;
  /** `["websocket", "sse"]`: Server-Sent Events when a WebSocket cannot be opened (default `["websocket"]`). */
  transports?: ("websocket" | "sse")[];
  /** Where the SSE stream is (default: `url` with `/ws` replaced by `/sse`, `ws` by `http`); `/sse` is added to a URL that does not end with it, and the stream's commands go to `…/api/sse` under the same prefix. */
  sseUrl?: string;
  /** ms an SSE stream may carry nothing (no frame, no heartbeat comment) before it counts as dead (default 65000). */
  sseSilence?: number;
  /** `fetch` for the SSE transport (default `globalThis.fetch`). */
  fetch?: typeof fetch;
}

export interface DisconnectInfo {
  code: number;
  reason: string;
  /** HTTP status of a refused handshake, when the WebSocket implementation tells it (`ws` does, browsers do not). */
  status?: number | null;
  wasConnected?: boolean;
  byClient?: boolean;
  willReconnect: boolean;
  /** ms until the next attempt, when `willReconnect`. */
  delay?: number;
}

export interface EventMeta {
  name: string;
  topic: string;
  /** Position in the topic's history (history topics only), else null. */
  offset: number | null;
  epoch: string | null;
  /** When the node received it; `undefined` with `compact: true`. */
  timestamp: string | undefined;
}

export interface SubscribedInfo {
  offset: number | null;
  epoch: string | null;
  /** Present when the client subscribed with `since` (a resubscription after a reconnect). */
  recovered?: boolean;
  /** True on a resubscription after a reconnect; false on the first subscription (and for a second `subscribe()` of a topic already subscribed). */
  resubscribed: boolean;
}

/** The publications replayed after a reconnect: offsets `from`..`to` inclusive (`from` > `to`: nothing was missed), as in `GapInfo`. */
export interface RecoveredInfo {
  /** The first offset replayed (the one after the position the client had). */
  from: number;
  /** The last offset replayed: the topic's newest offset when it resubscribed. */
  to: number;
  epoch: string;
}

/** Offsets `from`..`to` (inclusive) of `epoch` are lost and will not come. */
export interface GapInfo {
  /** The first offset lost. */
  from: number;
  /** The last offset lost; the subscription goes on after it. */
  to: number;
  epoch: string;
  /** Present when the server reset the topic's history (a new epoch) and the client already had the new epoch; a position in the old epoch gives `unrecoverable` instead. */
  previousEpoch?: string;
}

export interface UnrecoverableInfo {
  reason: string;
  previousEpoch: string | null;
  previousOffset: number | null;
  epoch: string | null;
  offset: number | null;
  from?: number;
  to?: number;
}

export interface SwitchboardError extends Error {
  code: string;
  topic?: string;
  /** The `error` frame; its `replyTo` names the message type it answers (`subscribe`, `unsubscribe`, `request`, `publish`, `refresh`, `rpc`, `presence`, `presence_stats`), when it answers one. */
  frame: any;
  /** `rpc` refused by the back end (`code` `rpc_failed`): the back end's numeric error code. */
  backendCode?: number;
}

/** A present client: its user (`""` when anonymous) and `info`. */
export interface PresenceEntry {
  user: string;
  info: any;
}

/** One coalesced presence change of a topic (`PRESENCE_DIFF_INTERVAL_MS`). */
export interface PresenceDiff {
  joins: Record<string, PresenceEntry>;
  leaves: Record<string, PresenceEntry>;
}

export interface PresenceHandlers {
  join?: (clientId: string, entry: PresenceEntry) => void;
  leave?: (clientId: string, entry: PresenceEntry) => void;
}

export interface SubscribeOptions {
  /** Sent to the server's subscribe hook with every (re)subscription. */
  data?: any;
  /** Asks for the topic's `presence_diff` (a `PRESENCE_TOPICS` topic). */
  presence?: boolean | PresenceHandlers;
}

/** What `refresh()` resolves with. */
export type RefreshResult =
  | { expiresAt: number | null; applied: "now" }
  | { expiresAt: undefined; applied: "on next connect" };

type Listener<T> = (arg: T) => void;

export declare class Subscription {
  readonly topic: string;
  readonly state: "pending" | "subscribed" | "unsubscribed";
  /** Offset of the last publication seen (history topics), else null. */
  readonly offset: number | null;
  readonly epoch: string | null;
  /** Resolves on the first `subscribed`; rejects when the server refuses the subscription. */
  readonly ready: Promise<Subscription>;
  /** True when the back end made it (`POST /api/subscribe`); see the client's `subscription` event. */
  readonly serverSide: boolean;
  /** Gets every publication of the topic; set it on a server-side subscription. */
  handler: (data: any, meta: EventMeta) => void;
  unsubscribe(): void;
  /** Who is on the topic: client id → `{user, info}`. */
  presence(): Promise<Record<string, PresenceEntry>>;
  /** How many clients and users are on the topic. */
  presenceStats(): Promise<{ clients: number; users: number }>;
  on(event: "presence_diff", fn: Listener<PresenceDiff>): this;
  on(event: "subscribed", fn: Listener<SubscribedInfo>): this;
  on(event: "recovered", fn: Listener<RecoveredInfo>): this;
  on(event: "gap", fn: Listener<GapInfo>): this;
  on(event: "unrecoverable", fn: Listener<UnrecoverableInfo>): this;
  on(event: "unsubscribed", fn: Listener<{ reason: string }>): this;
  on(event: "error", fn: Listener<SwitchboardError>): this;
  off(event: string, fn?: Listener<any>): this;
  once(event: string, fn: Listener<any>): this;
}

export declare class Switchboard {
  constructor(url: string, options?: SwitchboardOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** Server-assigned id of the current connection. */
  readonly clientId: string | null;
  /** The transport in use: `"websocket"`, or `"sse"` after a fallback. */
  readonly transport: "websocket" | "sse";
  token: string | null;
  connect(): Promise<Switchboard>;
  close(code?: number, reason?: string): void;
  subscribe(topic: string, handler?: (data: any, meta: EventMeta) => void, options?: SubscribeOptions): Subscription;
  /** Calls `method` on the application back end (RPC hook); resolves with its `data`, rejects with a `SwitchboardError` (`rpc_failed`, `unavailable`, `forbidden`, `bad_message`, `timeout`). */
  rpc(method: string, data?: any): Promise<any>;
  /** Throws when not connected. The server sends no acknowledgement. */
  publish(topic: string, data: any, options?: { name?: string }): void;
  request(topic: string): Promise<{ data: any; offset: number | null; timestamp: string }>;
  /** Who is on `topic` (`PRESENCE_TOPICS`); rejects with `no_presence`, `forbidden`, `unavailable`. */
  presence(topic: string): Promise<Record<string, PresenceEntry>>;
  presenceStats(topic: string): Promise<{ clients: number; users: number }>;
  /** Not connected: only keeps the token for the next connect (`applied: "on next connect"`). */
  refresh(token: string): Promise<RefreshResult>;
  /** Round-trip time in ms. */
  ping(): Promise<number>;
  on(event: "connecting", fn: Listener<{ attempt: number }>): this;
  on(event: "transport", fn: Listener<{ transport: "sse" }>): this;
  on(event: "connected", fn: Listener<{ clientId: string | null; reconnected: boolean }>): this;
  on(event: "disconnected", fn: Listener<DisconnectInfo>): this;
  on(event: "event", fn: Listener<EventMeta & { data: any }>): this;
  on(event: "recovered", fn: Listener<RecoveredInfo & { topic: string }>): this;
  on(event: "gap", fn: Listener<GapInfo & { topic: string }>): this;
  on(event: "unrecoverable", fn: Listener<UnrecoverableInfo & { topic: string }>): this;
  on(event: "unsubscribed", fn: Listener<{ topic: string; reason: string }>): this;
  /** The back end subscribed this connection to a topic (`POST /api/subscribe`). */
  on(event: "subscription", fn: Listener<Subscription>): this;
  on(event: "refreshed", fn: Listener<{ expiresAt: number | null }>): this;
  on(event: "token_expired", fn: Listener<any>): this;
  on(event: "duplicate", fn: Listener<EventMeta>): this;
  on(event: "presence_diff", fn: Listener<PresenceDiff & { topic: string }>): this;
  on(event: "message", fn: Listener<any>): this;
  on(event: "error", fn: Listener<SwitchboardError | { code: string; error: string }>): this;
  off(event: string, fn?: Listener<any>): this;
  once(event: string, fn: Listener<any>): this;
}

export default Switchboard;

/** A topic's key in SSE event ids (FNV-1a of its name, base 36). */
export function sseTopicKey(topic: string): string;
