//! The dashboard in a real browser: headless Chromium (the distribution's package, installed by
//! `.ci/run`) driven over the DevTools protocol. It logs in, sees a device connect live, sends
//! it a message the device receives, closes it, and saves a screenshot as a test artifact
//! (`test-artifacts/dashboard.png`).
//!
//! Without `/usr/bin/chromium` the test prints a notice and passes, unless
//! `MORRIGAN_TEST_REQUIRE_SERVICES` is set.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use common::Node;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole test, browser start included.
const BUDGET: Duration = Duration::from_secs(60);
/// Any one wait for the page.
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// A DevTools protocol connection, attached to one page (flattened session).
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("CDP send");
        loop {
            let frame = tokio::time::timeout(PAGE_WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("CDP open")
                .expect("CDP frame");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("CDP JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is truthy.
    async fn wait_for(&mut self, expr: &str, what: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        loop {
            let v = self.eval(expr).await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let notice = self
                    .eval("document.getElementById('notice').textContent")
                    .await;
                panic!("the page never showed {what} (notice: {notice})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("png data"))
            .expect("base64");
        std::fs::create_dir_all(path.parent().unwrap()).expect("artifact dir");
        std::fs::write(path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
    }
}

/// Chromium, killed when dropped.
struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

async fn launch() -> Browser {
    let profile = tempfile::TempDir::new().expect("profile dir");
    let child = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            "--remote-debugging-port=0",
            "--window-size=1280,800",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts");
    // With port 0 Chromium writes the port it chose and the browser target's path here.
    let port_file = profile.path().join("DevToolsActivePort");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&port_file)
            && t.lines().count() >= 2
        {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Chromium did not open its DevTools port"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut lines = text.lines();
    let port = lines.next().unwrap().trim().to_string();
    let path = lines.next().unwrap().trim().to_string();
    Browser {
        child,
        _profile: profile,
        ws_url: format!("ws://127.0.0.1:{port}{path}"),
    }
}

fn artifact(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../test-artifacts")
        .join(name)
}

#[tokio::test]
async fn dashboard_in_headless_chromium() {
    if !Path::new(CHROMIUM).exists() {
        common::skip(&format!("{CHROMIUM} is missing (apt-get install chromium)"));
        return;
    }
    tokio::time::timeout(BUDGET, run())
        .await
        .expect("browser test within its time budget");
}

async fn run() {
    let node = Node::start().await;
    let mut browser = launch().await;
    let (ws, _) = tokio_tungstenite::connect_async(browser.ws_url.as_str())
        .await
        .expect("DevTools WebSocket");
    let mut cdp = Cdp {
        ws,
        next_id: 0,
        session: None,
    };
    let target = cdp
        .call("Target.createTarget", json!({"url": "about:blank"}))
        .await;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    cdp.call("Page.enable", json!({})).await;
    cdp.call("Page.navigate", json!({"url": node.url("/dashboard")}))
        .await;
    cdp.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('login-form')",
        "the login form",
    )
    .await;

    // Log in.
    cdp.eval(&format!(
        "document.getElementById('login-name').value = 'admin';
         document.getElementById('login-password').value = {};
         document.getElementById('login-form').requestSubmit(); true",
        json!(common::ADMIN_PASSWORD)
    ))
    .await;
    cdp.wait_for(
        "document.getElementById('live').classList.contains('on')",
        "the live event stream",
    )
    .await;
    let stored = cdp
        .eval("sessionStorage.getItem('morrigan.token') !== null && location.href.indexOf('token') < 0")
        .await;
    assert_eq!(
        stored,
        json!(true),
        "token in sessionStorage, not in the URL"
    );

    // A device connects: its row appears live (from the event stream).
    let mut device = node.device("browser-device").await;
    let row = format!("document.querySelector('tr[data-id=\"{}\"]')", device.id);
    cdp.wait_for(&format!("!!{row}"), "the device's row").await;
    cdp.wait_for(
        "[...document.querySelectorAll('#events li[data-kind=\"connected\"]')]
               .some(li => li.textContent.includes('browser-device'))",
        "the connected event",
    )
    .await;
    // Two more devices, for a fuller picture.
    let _others = [
        node.device("sensor-hall-12").await,
        node.device("gateway-eu-1").await,
    ];
    device
        .send_json(&json!({"type": "client.state", "state": "ready"}))
        .await;
    cdp.wait_for(
        &format!("{row}.textContent.includes('ready')"),
        "the client state",
    )
    .await;

    // Its detail, then a message the device receives.
    cdp.eval(&format!(
        "document.querySelector('[data-detail=\"{}\"]').click(); true",
        device.id
    ))
    .await;
    cdp.wait_for(
        "!document.getElementById('detail').hidden && !document.getElementById('send-button').disabled",
        "the connection's detail",
    )
    .await;
    cdp.wait_for(
        "document.querySelectorAll('#history tr').length >= 1",
        "the client's history",
    )
    .await;
    cdp.eval(
        r#"document.getElementById('send-body').value = '{"type": "dashboard.hello", "n": 42}';
           document.getElementById('send-form').requestSubmit(); true"#,
    )
    .await;
    let got = device.next_json().await;
    assert_eq!(got, json!({"type": "dashboard.hello", "n": 42}));
    cdp.wait_for(
        "document.getElementById('send-result').className === 'ok'",
        "the send confirmation",
    )
    .await;

    // A send that asks for the device's reply shows the reply, and the client's messages list
    // it with its state.
    cdp.eval(
        r#"document.getElementById('send-body').value = '{"type": "dashboard.ask"}';
           document.getElementById('send-track').value = 'reply';
           document.getElementById('send-form').requestSubmit(); true"#,
    )
    .await;
    let asked = device.next_json().await;
    assert_eq!(asked["type"], "dashboard.ask", "{asked}");
    let id = asked["messageId"]
        .as_str()
        .expect("a tracked frame")
        .to_string();
    device
        .send_json(&json!({"type": "connection.reply", "messageId": id, "payload": {"answer": 42}}))
        .await;
    cdp.wait_for(
        "document.getElementById('send-result').textContent.includes('{\"answer\":42}')",
        "the device's reply",
    )
    .await;
    cdp.wait_for(
        &format!(
            "(document.querySelector('#messages tr[data-message=\"{id}\"]') || {{}}).textContent?.includes('replied')"
        ),
        "the replied message in the client's messages",
    )
    .await;
    cdp.screenshot(&artifact("dashboard.png")).await;

    // Close it: the device sees 4000 with the reason, the page sees it end.
    cdp.eval(
        "document.getElementById('close-reason').value = 'closed from the dashboard';
         document.getElementById('close-form').requestSubmit(); true",
    )
    .await;
    let frame = device.next_close().await;
    assert_eq!(u16::from(frame.code), 4000);
    assert_eq!(frame.reason.as_str(), "closed from the dashboard");
    cdp.wait_for(
        &format!("{row} && {row}.classList.contains('closed')"),
        "the closed connection",
    )
    .await;
    cdp.wait_for(
        "[...document.querySelectorAll('#events li[data-kind=\"disconnected\"]')]
           .some(li => li.textContent.includes('4000'))",
        "the disconnected event",
    )
    .await;

    // The nodes view lists this node.
    cdp.eval("document.querySelector('nav button[data-view=\"nodes\"]').click(); true")
        .await;
    cdp.wait_for(
        &format!(
            "document.getElementById('node-rows').textContent.includes('{}')",
            node.node_id()
        ),
        "this node in the nodes view",
    )
    .await;

    let close = json!({"id": 0, "method": "Browser.close"}).to_string();
    let _ = cdp.ws.send(Message::Text(close.into())).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), browser.child.wait()).await;
}
