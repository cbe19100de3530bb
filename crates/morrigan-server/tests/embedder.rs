//! The embedder API: a node built with [`ServerBuilder::provider`] routes a `type` prefix to
//! the embedder's provider and sends its reply frame; [`ServerBuilder::hook`] sees every
//! authenticate, connect, client state and disconnect, and refuses a connection with 403 before
//! the upgrade. Over real sockets, against a node started as an embedder would start it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{WAIT, Ws, next_close, next_json};
use futures_util::SinkExt;
use morrigan_protocol::records::ConnectionRecord;
use morrigan_server::hooks::{Disconnect, Hooks};
use morrigan_server::providers::{HandlerError, MessageContext, Provider};
use morrigan_server::{Server, ServerBuilder};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `echo.say` answers `echo.said` with the payload and where it came from; `echo.quiet`
/// answers nothing; `echo.invalid` and `echo.fail` fail as a handler may.
struct Echo;

#[async_trait]
impl Provider for Echo {
    fn name(&self) -> &str {
        "echo"
    }
    fn version(&self) -> &str {
        "2.5.0"
    }
    fn messages(&self) -> Vec<String> {
        ["say", "quiet", "invalid", "fail"]
            .map(String::from)
            .to_vec()
    }
    fn functions(&self) -> Vec<String> {
        vec!["echo.use".into()]
    }
    async fn handle(
        &self,
        ctx: &MessageContext,
        message: &str,
        body: Value,
    ) -> Result<Option<Value>, HandlerError> {
        match message {
            "say" => Ok(Some(json!({
                "type": "echo.said",
                "payload": body["payload"],
                "connectionId": &*ctx.connection_id,
                "clientId": &*ctx.client_id,
            }))),
            "quiet" => Ok(None),
            "invalid" => Err(HandlerError::Invalid("echo needs a payload".into())),
            "fail" => Err(HandlerError::Failed("the echo backend is down".into())),
            _ => Err(HandlerError::UnknownMessage),
        }
    }
}

/// Reports every hook call on a channel; refuses clients whose id starts with `banned`.
struct Recorder(mpsc::UnboundedSender<Value>);

#[async_trait]
impl Hooks for Recorder {
    async fn authenticate(&self, record: &ConnectionRecord) -> Result<(), String> {
        let _ = self.0.send(json!({
            "hook": "authenticate",
            "client": record.client_id,
            "connection": record.id,
            "connected": record.connected,
            "open": record.open,
        }));
        if record.client_id.starts_with("banned") {
            Err("banned by the embedder".into())
        } else {
            Ok(())
        }
    }
    async fn connect(&self, record: &ConnectionRecord) {
        let _ = self.0.send(json!({
            "hook": "connect",
            "client": record.client_id,
            "connection": record.id,
            "connected": record.connected.is_some(),
        }));
    }
    async fn disconnect(&self, event: &Disconnect) {
        let _ = self.0.send(json!({
            "hook": "disconnect",
            "client": event.client_id,
            "connection": event.connection_id,
            "code": event.code,
            "reason": event.reason,
        }));
    }
    async fn client_state(&self, connection_id: &str, client_id: &str, state: &str) {
        let _ = self.0.send(json!({
            "hook": "client_state",
            "client": client_id,
            "connection": connection_id,
            "state": state,
        }));
    }
}

/// A node started as an embedder starts one, on this test's runtime.
struct Embedded {
    base: String,
    ws_url: String,
    http: reqwest::Client,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Embedded {
    async fn start(build: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Embedded {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let config = common::config(dir.path().join("data"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = build(Server::builder(config).listener(listener))
            .build()
            .await
            .expect("node starts");
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("http");
        let base = format!("http://{addr}");
        let login: Value = http
            .post(format!("{base}/api/auth"))
            .json(&json!({"name": "admin", "password": common::ADMIN_PASSWORD}))
            .send()
            .await
            .expect("login")
            .json()
            .await
            .expect("login body");
        Embedded {
            ws_url: format!("ws://{addr}/api/core/connection/connect"),
            base,
            http,
            admin: login["token"].as_str().expect("token").to_string(),
            stop: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("request");
        common::read(res).await
    }

    /// Provisions `client` and exchanges its identity token for a connection token.
    async fn connection_token(&self, client: &str) -> String {
        let identity: String = self
            .http
            .post(format!("{}/api/core/client/provision", self.base))
            .bearer_auth(&self.admin)
            .json(&json!({"id": client}))
            .send()
            .await
            .expect("provision")
            .json()
            .await
            .expect("identity token");
        let body: Value = self
            .http
            .post(format!("{}/api/core/connection", self.base))
            .header("authorization", identity)
            .send()
            .await
            .expect("exchange")
            .json()
            .await
            .expect("exchange body");
        body["token"]
            .as_str()
            .expect("connection token")
            .to_string()
    }

    async fn open(&self, token: &str) -> common::Handshake {
        let mut req = self.ws_url.as_str().into_client_request().expect("request");
        req.headers_mut()
            .insert("origin", token.parse().expect("header"));
        let (ws, res) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("handshake in time")?;
        Ok((ws, res))
    }

    /// Connects `client`; returns the socket and its connection id.
    async fn device(&self, client: &str) -> (Ws, String) {
        let token = self.connection_token(client).await;
        let (mut ws, _) = self.open(&token).await.expect("connect");
        let first = next_json(&mut ws).await;
        assert_eq!(first["state"], "accepted", "{first}");
        let id = first["connectionId"].as_str().expect("id").to_string();
        (ws, id)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("node stopped in time")
                .expect("node task");
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("a hook call in time")
        .expect("hook channel open")
}

#[tokio::test]
async fn a_provider_handles_its_type_prefix_and_its_reply_is_sent() {
    let node = Embedded::start(|b| b.provider(Arc::new(Echo))).await;
    let (mut ws, id) = node.device("echoer").await;

    send(
        &mut ws,
        json!({"type": "echo.say", "payload": {"n": [1, 2]}}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "echo.said", "payload": {"n": [1, 2]}, "connectionId": id, "clientId": "echoer"})
    );
    // No reply is sent for a handler that answers nothing: the next frame answers the next
    // message.
    send(&mut ws, json!({"type": "echo.quiet"})).await;
    send(
        &mut ws,
        json!({"type": "echo.say", "payload": "after quiet"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["payload"], "after quiet");
    // The handler's failures become the documented connection.error frames.
    for (ty, error, reason) in [
        ("echo.invalid", "invalidMessage", "echo needs a payload"),
        ("echo.fail", "handlerFailed", "the echo backend is down"),
        (
            "echo.other",
            "unknownMessage",
            "provider 'echo' has no message 'other'",
        ),
        (
            "echoes.say",
            "unknownProvider",
            "no provider named 'echoes'",
        ),
    ] {
        send(&mut ws, json!({"type": ty})).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(
            reply,
            json!({"type": "connection.error", "error": error, "reason": reason, "messageType": ty})
        );
    }
    // The built-in providers are still there.
    send(&mut ws, json!({"type": "client.state", "state": "ready"})).await;
    send(&mut ws, json!({"type": "echo.say", "payload": 3})).await;
    assert_eq!(next_json(&mut ws).await["payload"], 3);

    // And it describes itself next to them.
    let (status, body) = node.get("/api/core/capability").await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["connection", "client", "capability", "echo"]);
    let echo = &body[3];
    assert_eq!(echo["version"], "2.5.0");
    assert_eq!(echo["messages"], json!(["say", "quiet", "invalid", "fail"]));
    assert_eq!(echo["functions"], json!(["echo.use"]));

    // Without the provider, the same message is an unknown provider.
    let plain = Embedded::start(|b| b).await;
    let (mut other, _) = plain.device("plain").await;
    send(&mut other, json!({"type": "echo.say", "payload": 1})).await;
    let reply = next_json(&mut other).await;
    assert_eq!(reply["error"], "unknownProvider", "{reply}");
    drop((ws, other));
    node.stop().await;
    plain.stop().await;
}

#[tokio::test]
async fn hooks_see_the_connection_and_may_refuse_it_before_the_upgrade() {
    let (tx, mut events) = mpsc::unbounded_channel();
    let node = Embedded::start(|b| b.hook(Arc::new(Recorder(tx)))).await;

    // Accepted: authenticate (before the accept, on the pending record), then connect.
    let (mut ws, id) = node.device("welcome").await;
    let auth = next_event(&mut events).await;
    assert_eq!(
        auth,
        json!({"hook": "authenticate", "client": "welcome", "connection": id, "connected": null, "open": true})
    );
    let connect = next_event(&mut events).await;
    assert_eq!(
        connect,
        json!({"hook": "connect", "client": "welcome", "connection": id, "connected": true})
    );
    send(&mut ws, json!({"type": "client.state", "state": "ready"})).await;
    assert_eq!(
        next_event(&mut events).await,
        json!({"hook": "client_state", "client": "welcome", "connection": id, "state": "ready"})
    );

    // Refused: 403 with the hook's reason, before the upgrade; the token is not consumed and
    // no connect or disconnect follows.
    let token = node.connection_token("banned-device").await;
    let (status, body) = common::refused(node.open(&token).await);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .contains("banned by the embedder"),
        "{body}"
    );
    let auth = next_event(&mut events).await;
    assert_eq!(auth["hook"], "authenticate");
    assert_eq!(auth["client"], "banned-device");
    let refused_id = auth["connection"].as_str().expect("id").to_string();
    let (status, record) = node
        .get(&format!("/api/core/connection/{refused_id}"))
        .await;
    assert_eq!(status, 200, "{record}");
    assert!(record["connected"].is_null(), "{record}");

    // The operator closes the accepted one: disconnect carries the code and reason, after the
    // record was written.
    let res = node
        .http
        .delete(format!("{}/api/core/connection/{id}?reason=bye", node.base))
        .bearer_auth(&node.admin)
        .send()
        .await
        .expect("close");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(u16::from(next_close(&mut ws).await.code), 4000);
    assert_eq!(
        next_event(&mut events).await,
        json!({"hook": "disconnect", "client": "welcome", "connection": id, "code": 4000, "reason": "bye"})
    );
    let (_, record) = node.get(&format!("/api/core/connection/{id}")).await;
    assert_eq!(record["open"], false, "{record}");
    // Nothing else was reported (the refused connection never connected).
    assert!(events.try_recv().is_err());
    node.stop().await;
}
