//! Test harness: real `switchboard` processes, a private `redis-server`, and
//! small WebSocket / HTTP / RESP clients.
//!
//! Nodes start on port 0 and report their address in the "listening on" log
//! line; nothing here sleeps to wait for start-up. Every process is killed on
//! drop, and its log is printed when the test is failing.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A unique Redis prefix per test.
pub fn prefix(name: &str) -> String {
    format!("t{}{}", std::process::id(), name.replace(['/', ' '], "_"))
}

// === redis-server ===

/// A private `redis-server` on a free loopback port, killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[])
    }

    /// Starts a server with `extra` arguments (e.g. cluster mode, replicaof).
    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        let dir = std::env::temp_dir().join(format!("sb-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.to_str().unwrap(),
                "--logfile",
                dir.join("redis.log").to_str().unwrap(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let redis = Redis {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(v) = redis.try_cmd(&["PING"])
                && v == "+PONG"
            {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {port} did not answer PING");
    }

    /// A handle to a server started elsewhere (another thread's), for
    /// commands only: dropping it stops nothing.
    pub fn connect_existing(port: u16) -> Redis {
        Redis {
            child: None,
            port,
            dir: std::path::PathBuf::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command; returns the first line of the reply.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args).expect("redis command")
    }

    pub fn try_cmd(&self, args: &[&str]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
        }
        s.write_all(req.as_bytes())?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end().to_string();
        if let Some(len) = line.strip_prefix('$') {
            let len: i64 = len.parse().unwrap_or(-1);
            if len < 0 {
                return Ok("(nil)".into());
            }
            let mut buf = vec![0; len as usize + 2];
            reader.read_exact(&mut buf)?;
            return Ok(String::from_utf8_lossy(&buf[..len as usize]).into_owned());
        }
        Ok(line)
    }

    /// Sends one command whose reply is an array of bulk strings and
    /// integers (such as `FCALL switchboard_publish`); `Err` with the text of
    /// an error reply.
    pub fn call(&self, args: &[&str]) -> Result<Vec<String>, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
        }
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let line = line.trim_end().to_string();
        if let Some(err) = line.strip_prefix('-') {
            return Err(err.to_string());
        }
        let n: usize = line
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("not an array reply: {line}"))?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut item = String::new();
            reader.read_line(&mut item).map_err(|e| e.to_string())?;
            let item = item.trim_end();
            if let Some(i) = item.strip_prefix(':') {
                out.push(i.to_string());
            } else if let Some(len) = item.strip_prefix('$') {
                let len: usize = len.parse().map_err(|_| item.to_string())?;
                let mut buf = vec![0; len + 2];
                reader.read_exact(&mut buf).map_err(|e| e.to_string())?;
                out.push(String::from_utf8_lossy(&buf[..len]).into_owned());
            } else {
                return Err(format!("unexpected array item: {item}"));
            }
        }
        Ok(out)
    }

    pub fn publish(&self, channel: &str, payload: &str) -> i64 {
        let r = self.cmd(&["PUBLISH", channel, payload]);
        r.trim_start_matches(':').parse().unwrap_or(-1)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_none() && self.dir.as_os_str().is_empty() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("--- redis-server :{} log ---\n{}", self.port, self.log());
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// === Redis Cluster and Sentinel topologies ===

/// A Redis Cluster of `primaries` primaries with `replicas` replicas each,
/// on free loopback ports; every server is killed on drop.
pub struct RedisCluster {
    pub servers: Vec<Redis>,
}

impl RedisCluster {
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let servers: Vec<Redis> = (0..primaries * (1 + replicas))
            .map(|_| {
                let port = free_port();
                let conf = format!("nodes-{port}.conf");
                Redis::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = servers
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { servers };
        assert!(
            eventually(Duration::from_secs(20), || cluster.servers.iter().all(
                |r| r
                    .try_cmd(&["CLUSTER", "INFO"])
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            ) && cluster.primaries().len()
                == primaries),
            "the cluster never became ok"
        );
        // Replicas copy their primary a moment after the cluster forms; a
        // failover before that would lose everything.
        assert!(
            eventually(Duration::from_secs(20), || cluster.servers.iter().all(
                |r| {
                    r.try_cmd(&["INFO", "replication"]).is_ok_and(|i| {
                        i.contains("role:master") || i.contains("master_link_status:up")
                    })
                }
            )),
            "the replicas never synced"
        );
        cluster
    }

    /// `redis-cluster://first?node=second&node=…`
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.servers[0].port);
        for (i, r) in self.servers.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", r.port));
        }
        url
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|r| r.port).collect()
    }

    /// Ports of the primaries that serve slots.
    pub fn primaries(&self) -> Vec<u16> {
        cluster_nodes(&self.ports())
            .into_iter()
            .filter(|(_, p, slots)| *p && !slots.is_empty())
            .map(|(port, _, _)| port)
            .collect()
    }

    /// The server that is primary for `key`'s slot now.
    pub fn owner(&self, key: &str) -> Option<&Redis> {
        let port = cluster_owner(&self.ports(), key)?;
        self.servers.iter().find(|r| r.port == port)
    }

    /// SIGKILLs the server on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(r) = self.servers.iter_mut().find(|r| r.port == port) {
            r.kill();
        }
    }
}

/// One line of `CLUSTER NODES`: port, whether it is a live primary, slot ranges.
pub type ClusterNode = (u16, bool, Vec<(u16, u16)>);

/// A live server's view of `CLUSTER NODES`.
pub fn cluster_nodes(ports: &[u16]) -> Vec<ClusterNode> {
    for port in ports {
        let Ok(text) = Redis::connect_existing(*port).try_cmd(&["CLUSTER", "NODES"]) else {
            continue;
        };
        if !text.contains("myself") {
            continue;
        }
        return text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port: u16 = f
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let flags = f.get(2)?;
                let primary = flags.contains("master") && !flags.contains("fail");
                let slots = f[8.min(f.len())..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|a| (a, a)),
                    })
                    .collect();
                Some((port, primary, slots))
            })
            .collect();
    }
    Vec::new()
}

/// The port of the live primary that serves `key`'s slot, asked of any of `ports`.
pub fn cluster_owner(ports: &[u16], key: &str) -> Option<u16> {
    let slot: u16 = ports
        .iter()
        .find_map(|p| {
            Redis::connect_existing(*p)
                .try_cmd(&["CLUSTER", "KEYSLOT", key])
                .ok()
        })?
        .trim_start_matches(':')
        .parse()
        .ok()?;
    cluster_nodes(ports)
        .into_iter()
        .find_map(|(port, primary, slots)| {
            (primary && slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))).then_some(port)
        })
}

/// A primary, one replica and three sentinels (quorum 2) watching it as
/// `main`; every process is killed on drop.
pub struct RedisSentinel {
    pub primary: Redis,
    pub replica: Redis,
    pub sentinels: Vec<Redis>,
}

impl RedisSentinel {
    pub const NAME: &'static str = "main";

    pub fn start() -> RedisSentinel {
        let primary = Redis::start();
        let replica = Redis::start_with(
            free_port(),
            &["--replicaof", "127.0.0.1", &primary.port.to_string()],
        );
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let dir =
                    std::env::temp_dir().join(format!("sb-sentinel-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let conf = dir.join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                         sentinel monitor {} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {} 1000\n\
                         sentinel failover-timeout {} 5000\n",
                        dir.display(),
                        dir.join("redis.log").display(),
                        Self::NAME,
                        primary.port,
                        Self::NAME,
                        Self::NAME,
                    ),
                )
                .unwrap();
                let child = Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel");
                let s = Redis {
                    child: Some(child),
                    port,
                    dir,
                };
                assert!(
                    eventually(Duration::from_secs(10), || s
                        .try_cmd(&["PING"])
                        .is_ok_and(|v| v == "+PONG")),
                    "sentinel did not start"
                );
                s
            })
            .collect();
        let topology = RedisSentinel {
            primary,
            replica,
            sentinels,
        };
        assert!(
            eventually(Duration::from_secs(15), || topology
                .replica
                .try_cmd(&["INFO", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"))),
            "the replica never synced"
        );
        topology
    }

    /// `redis-sentinel://s1?node=s2&node=s3&sentinelServiceName=main`
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}&sentinelServiceName={}",
            self.sentinels[0].port,
            self.sentinels[1].port,
            self.sentinels[2].port,
            Self::NAME
        )
    }

    /// The port the sentinels currently name as primary.
    pub fn primary_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            if let Ok(v) = s.call(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::NAME])
                && let Some(port) = v.get(1).and_then(|p| p.parse().ok())
            {
                return Some(port);
            }
        }
        None
    }
}

// === switchboard node ===

/// A `switchboard` process.
pub struct Node {
    child: Child,
    pub addr: String,
    pub name: String,
    log: Arc<Mutex<String>>,
}

impl Node {
    /// Starts a node with `env` (on top of HOST=127.0.0.1, PORT=0, no mock
    /// events) and waits for its "listening on" line.
    pub fn start(name: &str, env: &[(&str, &str)]) -> Node {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("NODE_ID", name)
            .env("WEBSOCKET_MOCK_EVENTS", "[]")
            .env("RUST_LOG", "info")
            .env("SHUTDOWN_GRACE_MS", "5000");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchboard");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on http://")
                    && let Some(tx) = tx.take()
                {
                    let rest = &line[i + "listening on http://".len()..];
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("node {name} did not start:\n{}", log.lock().unwrap());
            }
        };
        Node {
            child,
            addr,
            name: name.to_string(),
            log,
        }
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// SIGKILL, and wait for the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        http(&self.addr, "GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        http(&self.addr, "POST", path, Some(body), &[])
    }

    /// `GET /api/health` as JSON.
    pub fn health(&self) -> Value {
        self.get("/api/health").1
    }

    /// Starts a node on the Redis at `url` under `prefix` (plus `extra`) and
    /// waits up to `within` for its backplane to connect.
    pub fn start_on_redis(
        name: &str,
        url: &str,
        prefix: &str,
        extra: &[(&str, &str)],
        within: Duration,
    ) -> Node {
        let mut env = vec![("REDIS_URL", url), ("REDIS_PREFIX", prefix)];
        env.extend_from_slice(extra);
        let node = Node::start(name, &env);
        assert!(
            eventually(within, || node.health()["backplaneConnected"] == true),
            "{name} never connected: {}",
            node.health()
        );
        node
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- node {} ({}) log ---\n{}",
                self.name,
                self.addr,
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// === interop clients ===

/// Where `scripts/test` installed the official clients (`SWITCHBOARD_TOOLS`,
/// default `.tools/`).
pub fn tools() -> std::path::PathBuf {
    std::env::var_os("SWITCHBOARD_TOOLS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools"))
}

/// A script in `tests/interop/`.
pub fn interop_script(name: &str) -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(name)
        .display()
        .to_string()
}

/// The Python of the tools venv (python-socketio installed).
pub fn python() -> std::path::PathBuf {
    tools().join("venv/bin/python")
}

/// Runs an interop client to completion; fails the test (showing its output)
/// unless it exits 0 and says OK.
pub fn run_interop(program: &std::path::Path, args: &[&str]) {
    let is_node = program.file_name().is_some_and(|n| n == "node");
    assert!(
        is_node || program.exists(),
        "{} is missing: run ./scripts/test, which installs the interop clients",
        program.display()
    );
    if is_node {
        assert!(
            tools().join("node/node_modules/socket.io-client").exists(),
            "socket.io-client is not installed in {}: run ./scripts/test",
            tools().display()
        );
    }
    let out = Command::new(program)
        .args(args)
        .env("SWITCHBOARD_TOOLS", tools())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "interop client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("OK"), "{stdout}");
}

// === HTTP ===

/// A minimal HTTP/1.1 request; returns the status and the body as JSON
/// (`Value::String` when it is not JSON).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let (status, text) = http_text(addr, method, path, body, headers);
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

pub fn http_text(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// === WebSocket client ===

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A native-protocol client.
pub struct Client {
    pub ws: WsStream,
    pub client_id: String,
}

/// What ended a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16),
    NoCode,
}

impl Client {
    /// Connects and reads the `connected` message.
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let mut c = Client {
            ws,
            client_id: String::new(),
        };
        let hello = c.recv().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        c.client_id = hello["clientId"].as_str().unwrap().to_string();
        c
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::Text(t.into())).await.unwrap();
    }

    /// The next JSON message (10 s timeout).
    pub async fn recv(&mut self) -> Value {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("timed out waiting for a message")
    }

    pub async fn recv_within(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(f))) => panic!("closed: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("ws error: {e}"),
                None => panic!("stream ended"),
            }
        }
    }

    /// The next message of type `ty`, skipping events.
    pub async fn expect(&mut self, ty: &str) -> Value {
        loop {
            let m = self.recv().await;
            if m["type"] == ty {
                return m;
            }
            assert_eq!(m["type"], "event", "expected {ty}, got {m}");
        }
    }

    pub async fn subscribe(&mut self, topic: &str) {
        self.send(serde_json::json!({"type":"subscribe","event":topic}))
            .await;
        let m = self.expect("subscribed").await;
        assert_eq!(m["event"], topic);
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed_within(&mut self, timeout: Duration) -> Option<Closed> {
        Some(match self.close_within(timeout).await? {
            Some((code, _)) => Closed::Code(code),
            None => Closed::NoCode,
        })
    }

    /// The end of the connection within `timeout` (frames before it are
    /// skipped): the Close frame's code and reason, or `None` inside when
    /// it ended without one; `None` when it did not end in time.
    async fn close_within(&mut self, timeout: Duration) -> Option<Option<(u16, String)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?
            {
                Some(Ok(Message::Close(Some(f)))) => {
                    return Some(Some((u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return Some(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The Close frame's code and reason, within `timeout` (frames before
    /// it are skipped); `None` when none came.
    pub async fn close_frame_within(&mut self, timeout: Duration) -> Option<(u16, String)> {
        self.close_within(timeout).await.flatten()
    }
}

pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Whether a WebSocket handshake to `url` succeeds within `timeout`, tried
/// every 100 ms (a seat given back when a connection ends is seen a little
/// later).
pub async fn admitted_within(url: &str, timeout: Duration) -> bool {
    let attempts = async {
        while tokio_tungstenite::connect_async(url).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(timeout, attempts).await.is_ok()
}

/// A native client on `node` subscribed to `group`, and a Django Channels
/// app's `group_send(group, {"type": "status_update", "value": value})`
/// through the real `channels_redis` (layer `prefix`) on the Redis at
/// `redis_url`: the event the client gets.
pub async fn group_send_arrives(
    node: &Node,
    redis_url: &str,
    prefix: &str,
    group: &str,
    value: u32,
) -> Value {
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    c.subscribe(group).await;
    run_interop(
        &python(),
        &[
            &interop_script("compat_channels.py"),
            redis_url,
            prefix,
            "send",
            group,
            &serde_json::json!({"type": "status_update", "value": value}).to_string(),
        ],
    );
    c.expect("event").await
}

/// Waits until the leader among `nodes` listens on the compat channels
/// (its consumer's subscription checked, `src/redis.rs`).
pub fn consuming(nodes: &[&Node]) {
    assert!(
        eventually(Duration::from_secs(15), || nodes
            .iter()
            .any(|n| n.log().contains("listening on compat channels"))),
        "no node consumes the compat channels"
    );
}
