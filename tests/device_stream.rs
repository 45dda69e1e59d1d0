//! The board's apps as a client sees them: a real embedded node, its live
//! frame stream on topic `device.frame` over the native WebSocket protocol,
//! and `GET /api/frame`. The frames are decoded here from the documented
//! encodings (docs/protocol.md), and the clock is read back with tom-thumb's
//! digits as its BDF source defines them, not with the server's font code.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Client, Node, Redis, eventually, prefix};
use serde_json::{Value, json};

const W: usize = 64;
const H: usize = 32;

/// One decoded stream frame.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    t: i64,
    seq: u64,
    app: String,
    pixels: Vec<[u8; 3]>,
}

impl Frame {
    fn lit(&self, x: usize, y: usize) -> bool {
        self.pixels[y * W + x] != [0, 0, 0]
    }
    fn lit_count(&self) -> usize {
        self.pixels.iter().filter(|p| **p != [0, 0, 0]).count()
    }
}

/// Decodes the `data` of a `device.frame` publication (encoding `runs` or
/// `rgb`).
fn decode(d: &Value) -> Frame {
    assert_eq!(
        (d["width"].as_u64(), d["height"].as_u64()),
        (Some(64), Some(32)),
        "{d}"
    );
    let mut pixels = Vec::with_capacity(W * H);
    match d["encoding"].as_str().unwrap() {
        "runs" => {
            let palette: Vec<[u8; 3]> = d["palette"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let v = u32::from_str_radix(c.as_str().unwrap(), 16).unwrap();
                    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
                })
                .collect();
            let runs = BASE64.decode(d["runs"].as_str().unwrap()).unwrap();
            for pair in runs.chunks(2) {
                for _ in 0..=pair[0] {
                    pixels.push(palette[pair[1] as usize]);
                }
            }
        }
        "rgb" => {
            let bytes = BASE64.decode(d["pixels"].as_str().unwrap()).unwrap();
            pixels.extend(bytes.chunks(3).map(|c| [c[0], c[1], c[2]]));
        }
        other => panic!("unknown encoding {other}"),
    }
    assert_eq!(pixels.len(), W * H, "a whole frame");
    Frame {
        t: d["t"].as_i64().unwrap(),
        seq: d["seq"].as_u64().unwrap(),
        app: d["app"].as_str().unwrap().to_string(),
        pixels,
    }
}

/// `GET /api/frame` as a [`Frame`].
fn api_frame(node: &Node) -> Frame {
    let (status, body) = node.get("/api/frame");
    assert_eq!(status, 200, "{body}");
    let d = &body["data"];
    let hex = d["pixels"].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    Frame {
        t: d["t"].as_i64().unwrap(),
        seq: 0,
        app: d["app"].as_str().unwrap().to_string(),
        pixels: bytes.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
    }
}

/// Every stream frame `client` receives within `window`.
async fn collect(client: &mut Client, window: Duration) -> Vec<Frame> {
    let end = tokio::time::Instant::now() + window;
    let mut frames = Vec::new();
    while let Some(m) = client
        .recv_within(end.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if m["type"] == "event" && m["topic"] == "device.frame" {
            assert_eq!(m["name"], "frame");
            frames.push(decode(&m["data"]));
        }
    }
    frames
}

async fn stream_client(node: &Node) -> Client {
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    c.subscribe("device.frame").await;
    c
}

fn command(node: &Node, path: &str, body: Value) {
    let (status, resp) = node.post(path, &body.to_string());
    assert_eq!(status, 200, "{path} {body}: {resp}");
}

/// tom-thumb's digits from its BDF source (3 columns, left bit first).
const DIGITS: [[u8; 5]; 10] = [
    [0b011, 0b101, 0b101, 0b101, 0b110],
    [0b010, 0b110, 0b010, 0b010, 0b010],
    [0b110, 0b001, 0b010, 0b100, 0b111],
    [0b110, 0b001, 0b010, 0b001, 0b110],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b110, 0b001, 0b110],
    [0b011, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b010, 0b100, 0b100],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b110],
];

/// Reads `HH:MM` in tom-thumb off the board: the glyphs are the groups of
/// lit columns inside the 5 lit rows.
fn read_clock(f: &Frame) -> String {
    let rows: Vec<usize> = (0..H).filter(|&y| (0..W).any(|x| f.lit(x, y))).collect();
    assert_eq!(rows.len(), 5, "one line of 5-pixel digits: rows {rows:?}");
    let (top, bottom) = (rows[0], rows[4]);
    assert_eq!(bottom - top, 4, "contiguous rows");
    let mut text = String::new();
    let mut x = 0;
    while x < W {
        if !(top..=bottom).any(|y| f.lit(x, y)) {
            x += 1;
            continue;
        }
        let start = x;
        while x < W && (top..=bottom).any(|y| f.lit(x, y)) {
            x += 1;
        }
        let width = x - start;
        let glyph: Vec<u8> = (top..=bottom)
            .map(|y| (start..x).fold(0u8, |acc, gx| acc << 1 | u8::from(f.lit(gx, y))))
            .collect();
        if width == 1 && glyph == [0, 1, 0, 1, 0] {
            text.push(':');
            continue;
        }
        let pad = 3 - width.min(3);
        let digit = DIGITS
            .iter()
            .position(|d| {
                d.iter()
                    .zip(&glyph)
                    .all(|(row, g)| row >> pad == *g && row & ((1 << pad) - 1) == 0)
            })
            .unwrap_or_else(|| panic!("no digit looks like {glyph:?} (x = {start})"));
        text.push(char::from(b'0' + digit as u8));
    }
    text
}

fn date_utc() -> String {
    let out = Command::new("date")
        .args(["-u", "+%H:%M"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// How far `b` is `a` moved left: the smallest `s` ≥ 1 with
/// `b(x, y) = a(x + s, y)` wherever both are on the board.
fn left_shift(a: &Frame, b: &Frame) -> Option<usize> {
    (1..=16).find(|&s| {
        (0..H).all(|y| (0..W - s).all(|x| b.pixels[y * W + x] == a.pixels[y * W + x + s]))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scroll_text_frames_change_and_move_left() {
    let node = Node::start("stream-scroll", &[]);
    command(
        &node,
        "/api/config",
        json!({"app": "scroll_text", "config": {"text": "HELLO"}}),
    );
    command(&node, "/api/switch", json!({"app": "scroll_text"}));
    let mut c = stream_client(&node).await;
    let frames: Vec<Frame> = collect(&mut c, Duration::from_secs(3))
        .await
        .into_iter()
        .filter(|f| f.app == "scroll_text")
        .collect();
    let changes = frames
        .windows(2)
        .filter(|w| w[0].pixels != w[1].pixels)
        .count();
    assert!(changes >= 10, "{changes} changes in 3 s");
    // At most DEVICE_FPS (20) a second, each one a change.
    assert!(frames.len() <= 3 * 20 + 2, "{} frames in 3 s", frames.len());
    assert!(
        frames.windows(2).all(|w| w[0].pixels != w[1].pixels),
        "only changes"
    );
    assert!(
        frames
            .windows(2)
            .all(|w| w[1].seq > w[0].seq && w[1].t > w[0].t)
    );
    // Green "HELLO" text, moving left: each frame is the one before moved
    // left, except where the text wraps round to the right edge again.
    let moved = frames
        .windows(2)
        .filter(|w| w[0].lit_count() > 0 && left_shift(&w[0], &w[1]).is_some())
        .count();
    assert!(
        moved + 2 >= changes,
        "{moved} of {changes} changes moved left"
    );
    assert!(moved >= 10, "{moved}");
    let colors: std::collections::BTreeSet<[u8; 3]> = frames
        .iter()
        .flat_map(|f| f.pixels.iter().copied())
        .collect();
    assert!(
        colors.iter().all(|c| c[0] == 0 && c[2] == 0),
        "green on black: {colors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_shows_the_utc_minute_and_streams_only_changes() {
    let node = Node::start("stream-clock", &[]);
    command(&node, "/api/switch", json!({"app": "clock"}));
    let (_, state) = node.get("/api/state");
    assert_eq!(state["data"]["config"]["font"], "tom-thumb");
    assert_eq!(state["data"]["config"]["timezone"], "UTC");
    // GET /api/frame against `date -u`, minute boundaries allowed for.
    let before = date_utc();
    let frame = api_frame(&node);
    let after = date_utc();
    let shown = read_clock(&frame);
    assert!(
        shown == before || shown == after,
        "board {shown}, date -u {before}..{after}"
    );

    // The stream: the current picture, then nothing until the minute turns.
    let mut c = stream_client(&node).await;
    command(&node, "/api/settings", json!({"brightness": 100}));
    let frames = collect(&mut c, Duration::from_secs(3)).await;
    assert!(!frames.is_empty(), "the brightness change is streamed");
    let last = frames.last().unwrap();
    let text = read_clock(last);
    let minutes: std::collections::BTreeSet<i64> = frames.iter().map(|f| f.t / 60_000).collect();
    assert!(
        frames.len() <= minutes.len() + 1,
        "a still clock streams nothing more: {} frames over minutes {minutes:?}",
        frames.len()
    );
    assert!(
        last.pixels
            .iter()
            .all(|p| *p == [0, 0, 0] || *p == [255, 255, 255])
    );
    assert_eq!(text.len(), 5);

    // Another font and a time zone: the minute is the same, the hour moves.
    command(
        &node,
        "/api/config",
        json!({"config": {"timezone": "Asia/Kolkata"}}),
    );
    let shown = read_clock(&api_frame(&node));
    let utc = date_utc();
    let to_min = |s: &str| s[..2].parse::<i64>().unwrap() * 60 + s[3..].parse::<i64>().unwrap();
    let diff = (to_min(&shown) - to_min(&utc)).rem_euclid(24 * 60);
    assert!((329..=331).contains(&diff), "UTC+5:30: {shown} vs {utc}");
    command(
        &node,
        "/api/config",
        json!({"config": {"font": "10x20", "timezone": "UTC"}}),
    );
    let big = api_frame(&node);
    assert!(big.lit_count() > 3 * frame.lit_count(), "10x20 is larger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stars_twinkle_and_brightness_scales_the_stream() {
    let node = Node::start("stream-stars", &[]);
    command(
        &node,
        "/api/config",
        json!({"app": "stars", "config": {"density": 60, "color": [255, 255, 255]}}),
    );
    command(&node, "/api/settings", json!({"brightness": 100}));
    command(&node, "/api/switch", json!({"app": "stars"}));
    let mut c = stream_client(&node).await;
    let frames: Vec<Frame> = collect(&mut c, Duration::from_secs(2))
        .await
        .into_iter()
        .filter(|f| f.app == "stars")
        .collect();
    let distinct: std::collections::BTreeSet<Vec<[u8; 3]>> =
        frames.iter().map(|f| f.pixels.clone()).collect();
    assert!(
        distinct.len() >= 10,
        "{} different skies in 2 s",
        distinct.len()
    );
    assert!(frames.iter().all(|f| f.lit_count() > 200), "density 60");
    let max = |f: &Frame| f.pixels.iter().flatten().copied().max().unwrap();
    assert_eq!(max(frames.last().unwrap()), 255);

    command(&node, "/api/settings", json!({"brightness": 10}));
    let dim = collect(&mut c, Duration::from_millis(800)).await;
    let last = dim.last().expect("frames after the change");
    assert!(
        max(last) <= 25,
        "brightness 10 scales every pixel: {}",
        max(last)
    );
    assert!(last.lit_count() > 200);
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let node = Node::start("stream-config", &[]);
    for (body, why) in [
        (
            json!({"app": "clock", "config": {"font": "comic-sans"}}),
            r#"config.font must be one of tom-thumb, 6x10, 10x20, 9x15B; "comic-sans" is unknown"#,
        ),
        (
            json!({"app": "clock", "config": {"timezone": "Mars/Olympus"}}),
            "config.timezone must be a time zone name",
        ),
        (
            json!({"app": "clock", "config": {"format_24h": "yes"}}),
            "config.format_24h must be true or false",
        ),
        (
            json!({"app": "scroll_text", "config": {"speed": 0}}),
            "config.speed must be a whole number from 1 to 100",
        ),
        (
            json!({"app": "stars", "config": {"density": 101}}),
            "config.density",
        ),
    ] {
        let (status, resp) = node.post("/api/config", &body.to_string());
        assert_eq!(status, 400, "{body}: {resp}");
        assert!(
            resp["error"].as_str().unwrap().contains(why),
            "{body}: {resp}"
        );
    }
    let (_, state) = node.get("/api/state");
    assert_eq!(
        state["data"]["configs"]["clock"]["font"], "tom-thumb",
        "nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_keeps_no_history_even_with_history_topics_star() {
    let redis = Redis::start();
    let pfx = prefix("stream-history");
    let node = Node::start_on_redis(
        "stream-history",
        &redis.url(),
        &pfx,
        &[("HISTORY_TOPICS", "*"), ("LEADER_LEASE_MS", "3000")],
        Duration::from_secs(10),
    );
    assert!(eventually(
        Duration::from_secs(10),
        || node.health()["leader"] == true
    ));
    command(&node, "/api/switch", json!({"app": "stars"}));
    let mut c = stream_client(&node).await;
    let frames = collect(&mut c, Duration::from_secs(1)).await;
    assert!(frames.len() >= 5, "{} frames", frames.len());
    // No history through the API, none in Redis, no FCALL either.
    let (status, body) = node.get("/api/history/device.frame");
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("keeps no history"),
        "{body}"
    );
    assert_eq!(
        redis.cmd(&["EXISTS", &format!("{pfx}:history:{{device.frame}}")]),
        ":0"
    );
    let refused = redis
        .call(&[
            "FCALL",
            "switchboard_publish",
            "1",
            "device.frame",
            r#"{"event":"frame","data":{}}"#,
            &pfx,
        ])
        .unwrap_err();
    assert!(refused.contains("is not a history topic"), "{refused}");
    // A subscriber asking for a replay gets the live stream only.
    let mut late = Client::connect(&node.ws_url("/ws")).await;
    late.send(
        json!({"type": "subscribe", "event": "device.frame", "since": {"offset": 0, "epoch": "x"}}),
    )
    .await;
    let ok = late.expect("subscribed").await;
    assert!(ok.get("offset").is_none(), "{ok}");
    let first = late.expect("event").await;
    assert!(
        first.get("offset").is_none(),
        "live frames carry no offset: {first}"
    );
    // The other topics still keep theirs.
    let (status, _) = node.get("/api/history/device");
    assert_eq!(status, 200);
    // Nobody but the leader's show draws on the stream: a client's or the
    // API's publication is refused with the reason.
    late.send(json!({"type": "publish", "event": "device.frame", "data": {"w": 1}}))
        .await;
    let refused = late.expect("error").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("live picture"),
        "{refused}"
    );
    let (status, body) = node.post(
        "/api/publish",
        &json!({"topic": "device.frame", "data": {"w": 1}}).to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("live picture"),
        "{body}"
    );
}
