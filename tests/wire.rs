//! Bytes on the wire: the native compact event frame a client asks for with
//! `?format=compact`, next to the default frame, on a real node.

mod common;

use std::time::Duration;

use common::{Client, Node};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The next text frame as sent, unparsed.
async fn raw(c: &mut Client) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), c.ws.next())
            .await
            .expect("timed out waiting for a frame");
        match msg {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Close(f))) => panic!("closed: {f:?}"),
            Some(Ok(_)) => continue,
            other => panic!("stream ended: {other:?}"),
        }
    }
}

async fn subscribe(c: &mut Client, topic: &str) -> Value {
    c.send(json!({"type":"subscribe","event":topic})).await;
    let m = c.expect("subscribed").await;
    assert_eq!(m["event"], topic);
    m
}

#[tokio::test]
async fn a_compact_client_gets_array_frames_at_most_60_percent_of_the_default() {
    let node = Node::start("wire-compact", &[("HISTORY_TOPICS", "h.*")]);
    let mut plain = Client::connect(&node.ws_url("/ws")).await;
    let mut compact = Client::connect(&node.ws_url("/ws?format=compact")).await;
    let mut other = Client::connect(&node.ws_url("/ws?format=compact")).await;

    // The benchmark's publication: event `tick` on a topic of another name.
    let topic = "bench-0a1b2c3d";
    let told = subscribe(&mut plain, topic).await;
    assert!(
        told.get("id").is_none(),
        "no id for default clients: {told}"
    );
    let told = subscribe(&mut compact, topic).await;
    let id = told["id"]
        .as_u64()
        .expect("a compact client is told the topic's id");
    assert_eq!(
        subscribe(&mut other, topic).await["id"],
        id,
        "one id per topic"
    );

    let data = json!({"seq": 1234, "ts": 1_764_315_120_123_456u64, "pad": "x".repeat(32)});
    let body = json!({"topic": topic, "event": "tick", "data": data}).to_string();
    assert_eq!(node.post("/api/publish", &body).0, 202);
    let default_frame = raw(&mut plain).await;
    let compact_frame = raw(&mut compact).await;
    let d: Value = serde_json::from_str(&default_frame).unwrap();
    assert_eq!(d["type"], "event");
    assert_eq!(d["topic"], topic);
    let c: Value = serde_json::from_str(&compact_frame).unwrap();
    assert_eq!(c, json!([id, data, "tick"]), "{compact_frame}");
    assert_eq!(raw(&mut other).await, compact_frame);
    assert!(
        compact_frame.len() * 10 <= default_frame.len() * 6,
        "{} of {} bytes: {compact_frame} against {default_frame}",
        compact_frame.len(),
        default_frame.len()
    );

    // A history topic: the offset follows the data; the name is left out
    // when it is the topic's.
    let told = subscribe(&mut compact, "h.x").await;
    let hid = told["id"].as_u64().unwrap();
    assert_ne!(hid, id);
    assert_eq!(told["offset"], 0);
    assert_eq!(
        node.post("/api/publish", r#"{"topic":"h.x","data":{"n":1}}"#)
            .0,
        202
    );
    assert_eq!(raw(&mut compact).await, format!(r#"[{hid},{{"n":1}},1]"#));
    assert_eq!(
        node.post(
            "/api/publish",
            r#"{"topic":"h.x","event":"other","data":"s"}"#
        )
        .0,
        202
    );
    assert_eq!(raw(&mut compact).await, format!(r#"[{hid},"s",2,"other"]"#));
    // Recovery with `since` replays compact frames after the answer.
    let mut late = Client::connect(&node.ws_url("/ws?format=compact")).await;
    let epoch = told["epoch"].as_str().unwrap();
    late.send(json!({"type":"subscribe","event":"h.x","since":{"offset":0,"epoch":epoch}}))
        .await;
    let answer = late.expect("subscribed").await;
    assert_eq!(answer["recovered"], true);
    assert_eq!(answer["id"], hid);
    assert_eq!(raw(&mut late).await, format!(r#"[{hid},{{"n":1}},1]"#));
    assert_eq!(raw(&mut late).await, format!(r#"[{hid},"s",2,"other"]"#));

    // Everything else keeps its usual form.
    compact.send(json!({"type":"ping"})).await;
    assert_eq!(compact.expect("pong").await["type"], "pong");
}

#[tokio::test]
async fn the_compact_form_works_with_a_path_topic_and_a_bad_format_is_refused() {
    let node = Node::start("wire-path", &[]);
    let mut c = Client::connect(&node.ws_url("/ws/news?format=compact")).await;
    let told = c.expect("subscribed").await;
    let id = told["id"].as_u64().unwrap();
    assert_eq!(
        node.post("/api/publish", r#"{"topic":"news","data":[1,2]}"#)
            .0,
        202
    );
    // Every topic keeps history by default: the offset follows the data.
    assert_eq!(raw(&mut c).await, format!("[{id},[1,2],1]"));
    // `format=json` is the default frame.
    let mut j = Client::connect(&node.ws_url("/ws/news?format=json")).await;
    assert!(j.expect("subscribed").await.get("id").is_none());

    for path in ["/ws?format=xml", "/ws/news?format=xml"] {
        match tokio_tungstenite::connect_async(node.ws_url(path)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 400);
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
                assert!(body.contains("format=xml is not valid"), "{body}");
            }
            other => panic!("expected 400, got {other:?}"),
        }
    }
}

/// Frames a client sends in one write are answered in one go by the node
/// (one wake-up of its writer): every answer still comes, in order, and a
/// publication after them arrives as before.
#[tokio::test]
async fn frames_sent_together_are_each_answered_in_order() {
    use futures_util::SinkExt;

    let node = Node::start("wire-together", &[]);
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    for text in [
        json!({"type":"subscribe","event":"together.a"}).to_string(),
        json!({"type":"unsubscribe","event":"together.a"}).to_string(),
        "not json".to_string(),
        json!({"type":"subscribe","event":"together.b"}).to_string(),
    ] {
        c.ws.feed(Message::Text(text.into())).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    let answers: Vec<Value> = [
        c.recv().await,
        c.recv().await,
        c.recv().await,
        c.recv().await,
    ]
    .into();
    let kinds: Vec<(&str, &str)> = answers
        .iter()
        .map(|m| {
            (
                m["type"].as_str().unwrap(),
                m["event"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("subscribed", "together.a"),
            ("unsubscribed", "together.a"),
            ("error", ""),
            ("subscribed", "together.b"),
        ],
        "{answers:?}"
    );
    let (status, body) = node.post("/api/publish", r#"{"topic":"together.b","data":{"n":1}}"#);
    assert_eq!(status, 202, "{body}");
    let event = c.expect("event").await;
    assert_eq!(event["name"], "together.b", "{event}");
}

/// The answers to frames a client sends together and the publications it
/// receives meanwhile are one stream: whichever side writes them (the
/// writer, or the reader at the end of its hold), every publication arrives
/// once and in order, and every answer in the order of its frame.
#[tokio::test]
async fn answers_and_deliveries_interleave_in_order() {
    use futures_util::SinkExt;

    const PUBLICATIONS: u64 = 300;
    const PAIRS: usize = 100;
    let node = Node::start(
        "wire-interleave",
        &[
            ("WEBSOCKET_RATE_LIMIT", "0"),
            ("WEBSOCKET_SUBSCRIBE_RATE_LIMIT", "0"),
        ],
    );
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    subscribe(&mut c, "interleave.feed").await;
    let addr = node.addr.clone();
    let publisher = std::thread::spawn(move || {
        for n in 0..PUBLICATIONS {
            let body = json!({"topic":"interleave.feed","data":{"n":n}}).to_string();
            let (status, answer) = common::http(&addr, "POST", "/api/publish", Some(&body), &[]);
            assert_eq!(status, 202, "{answer}");
        }
    });
    for i in 0..PAIRS {
        let topic = format!("interleave.churn.{i}");
        for kind in ["subscribe", "unsubscribe"] {
            let text = json!({"type":kind,"event":topic}).to_string();
            c.ws.feed(Message::Text(text.into())).await.unwrap();
        }
        c.ws.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut next_n = 0;
    let mut answers = Vec::new();
    while next_n < PUBLICATIONS || answers.len() < 2 * PAIRS {
        let m = c.recv().await;
        match m["type"].as_str().unwrap() {
            "event" => {
                assert_eq!(
                    m["data"]["n"], next_n,
                    "publications in order, none lost: {m}"
                );
                next_n += 1;
            }
            "subscribed" | "unsubscribed" => answers.push(m),
            _ => panic!("unexpected frame {m}"),
        }
    }
    publisher.join().unwrap();
    for (i, pair) in answers.chunks(2).enumerate() {
        let topic = format!("interleave.churn.{i}");
        assert_eq!(pair[0]["type"], "subscribed", "{pair:?}");
        assert_eq!(pair[0]["event"], topic.as_str(), "{pair:?}");
        assert_eq!(pair[1]["type"], "unsubscribed", "{pair:?}");
        assert_eq!(pair[1]["event"], topic.as_str(), "{pair:?}");
    }
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_none(),
        "nothing twice"
    );
}
