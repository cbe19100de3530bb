//! The connection event stream (`GET /api/core/connection/events`) as an operator reads it.

use serde_json::Value;

use super::{Node, WAIT};

/// A Server-Sent Events subscription read with a streaming body.
pub struct Events {
    res: reqwest::Response,
    buf: String,
    /// Events read but not yet asked for.
    seen: Vec<(String, Value)>,
}

impl Events {
    pub async fn open(node: &Node, token: &str) -> Events {
        // No total timeout: the stream lives as long as the test reads it.
        let http = reqwest::Client::new();
        let res = http
            .get(node.url("/api/core/connection/events"))
            .bearer_auth(token)
            .send()
            .await
            .expect("events request");
        Self::from_response(res).await
    }

    /// Reads a subscription already requested, up to its `ready` event.
    pub async fn from_response(res: reqwest::Response) -> Events {
        assert_eq!(res.status().as_u16(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let mut events = Events {
            res,
            buf: String::new(),
            seen: Vec::new(),
        };
        let (kind, data) = events.next().await;
        assert_eq!(kind, "ready", "{data}");
        events
    }

    /// The next event (`event:` and parsed `data:`), skipping keep-alive comments.
    pub async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut kind = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let value = serde_json::from_str(&data).expect("event data is JSON");
                return (kind, value);
            }
            let chunk = tokio::time::timeout(WAIT, self.res.chunk())
                .await
                .expect("an event in time")
                .expect("stream readable")
                .expect("stream still open");
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The first event of `kind` for `connection_id`, read now or earlier (events of different
    /// connections may interleave in any order).
    pub async fn until(&mut self, kind: &str, connection_id: &str) -> Value {
        let matches = |(k, v): &(String, Value)| k == kind && v["connectionId"] == connection_id;
        loop {
            if let Some(i) = self.seen.iter().position(matches) {
                let (_, v) = self.seen.remove(i);
                assert_eq!(v["type"], kind, "{v}");
                return v;
            }
            let ev = self.next().await;
            self.seen.push(ev);
        }
    }

    /// The first event (read now or earlier) whose data satisfies `pred`.
    pub async fn next_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            if let Some(i) = self.seen.iter().position(|(_, v)| pred(v)) {
                return self.seen.remove(i).1;
            }
            let ev = self.next().await;
            self.seen.push(ev);
        }
    }
}
