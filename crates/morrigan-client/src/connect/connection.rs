//! [`Connection`]: one WebSocket from the upgrade on: waiting for `accepted`, then messages
//! both ways (validated JSON objects with a `type`) and the close handshake.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use morrigan_protocol::message::{ConnectionState, types};
use morrigan_protocol::{MessageType, close};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use url::Url;

use super::WsStream;
use crate::Error;

/// What [`Connection::recv`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A JSON object with a valid `type`.
    Message(Value),
    /// The connection ended: the peer's close code (1005 when it sent none, 1006 when the socket
    /// ended without a close frame) and reason.
    Closed { code: u16, reason: String },
}

/// An accepted WebSocket connection.
pub struct Connection {
    ws: WsStream,
    url: Url,
    connection_id: Option<String>,
    /// Messages that arrived before `accepted` (none from a conforming server), delivered first.
    pending: VecDeque<Value>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url.as_str())
            .field("connection_id", &self.connection_id)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Waits up to `timeout` for the server to accept the freshly upgraded `ws` (opened at
    /// `url`); on any failure the socket is closed before the error is returned.
    pub(super) async fn accept(ws: WsStream, url: Url, timeout: Duration) -> Result<Self, Error> {
        let mut connection = Connection {
            ws,
            url,
            connection_id: None,
            pending: VecDeque::new(),
        };
        match tokio::time::timeout(timeout, connection.wait_accepted()).await {
            Err(_) => {
                connection.abort().await;
                Err(Error::Timeout("connection.state accepted"))
            }
            Ok(Err(e)) => {
                connection.abort().await;
                Err(e)
            }
            Ok(Ok(())) => Ok(connection),
        }
    }

    /// The connection record's id, when the server sent one with `accepted`.
    pub fn connection_id(&self) -> Option<&str> {
        self.connection_id.as_deref()
    }

    /// The WebSocket URL (the token's `reportUrl`, mapped to ws/wss).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Sends a message after checking that it is an object with a valid `type`.
    pub async fn send(&mut self, message: &Value) -> Result<(), Error> {
        let text = encode(message)?;
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends text already produced by [`encode`].
    pub(crate) async fn send_text(&mut self, text: String) -> Result<(), Error> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// The next message. Pings are answered (by tungstenite) while this is polled; frames that are
    /// not a JSON object with a valid `type` are skipped. Cancel-safe.
    pub async fn recv(&mut self) -> Incoming {
        if let Some(message) = self.pending.pop_front() {
            return Incoming::Message(message);
        }
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => match decode(text.as_str()) {
                    Ok(message) => return Incoming::Message(message),
                    Err(why) => tracing::debug!(%why, "ignoring frame"),
                },
                Some(Ok(Message::Binary(bytes))) => {
                    // The original server parsed binary frames as JSON too; so does this.
                    match std::str::from_utf8(&bytes)
                        .map_err(|e| e.to_string())
                        .and_then(decode)
                    {
                        Ok(message) => return Incoming::Message(message),
                        Err(why) => tracing::debug!(%why, "ignoring binary frame"),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((close::NO_STATUS, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    });
                    // tungstenite queued the close reply; polling on flushes it and ends the
                    // stream. Bounded, in case the server never closes the TCP connection.
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.drain()).await;
                    return Incoming::Closed { code, reason };
                }
                Some(Ok(_)) => {} // Ping/Pong/raw frames: nothing to do.
                Some(Err(e)) => {
                    return Incoming::Closed {
                        code: close::ABNORMAL,
                        reason: e.to_string(),
                    };
                }
                None => {
                    return Incoming::Closed {
                        code: close::ABNORMAL,
                        reason: "connection ended without a close frame".into(),
                    };
                }
            }
        }
    }

    /// Closes with `code` and `reason` and waits up to `timeout` for the server's close. Returns
    /// the server's close code (1006 when it did not answer).
    pub async fn close(mut self, code: u16, reason: &str, timeout: Duration) -> u16 {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        // Sending the close is bounded too: a server that stopped reading would block it.
        let handshake = async {
            if self.ws.close(Some(frame)).await.is_err() {
                return close::ABNORMAL;
            }
            loop {
                match self.recv().await {
                    Incoming::Closed { code, .. } => return code,
                    Incoming::Message(_) => {} // too late to handle
                }
            }
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .unwrap_or(close::ABNORMAL)
    }

    /// Gives up the connection's parts, for callers that want the raw WebSocket.
    pub fn into_inner(self) -> WsStream {
        self.ws
    }

    async fn drain(&mut self) {
        while self.ws.next().await.is_some() {}
    }

    async fn abort(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }

    async fn wait_accepted(&mut self) -> Result<(), Error> {
        loop {
            match self.recv().await {
                Incoming::Message(message)
                    if message.get("type").and_then(Value::as_str)
                        == Some(types::CONNECTION_STATE) =>
                {
                    let state: ConnectionState = serde_json::from_value(message).map_err(|e| {
                        Error::Protocol(format!("connection.state is malformed: {e}"))
                    })?;
                    return match state.state.as_str() {
                        "accepted" => {
                            self.connection_id = state.connection_id;
                            Ok(())
                        }
                        "rejected" => Err(Error::Rejected {
                            reason: state.reason.unwrap_or_default(),
                        }),
                        other => Err(Error::Protocol(format!(
                            "unexpected connection.state {other:?}"
                        ))),
                    };
                }
                Incoming::Message(message) => self.pending.push_back(message),
                Incoming::Closed { code, reason } => {
                    return Err(stop_error(code, &reason)
                        .unwrap_or(Error::ClosedBeforeAccepted { code, reason }));
                }
            }
        }
    }
}

/// The error that stops a client after a close with `code`, when the code says to stop.
pub(crate) fn stop_error(code: u16, reason: &str) -> Option<Error> {
    match close::advice(code) {
        close::Advice::Stop if code == close::SUPERSEDED => Some(Error::Superseded {
            reason: reason.to_string(),
        }),
        close::Advice::Stop => Some(Error::Revoked {
            code,
            reason: reason.to_string(),
        }),
        close::Advice::Reconnect | close::Advice::ReconnectWithJitter => None,
    }
}

/// Serializes a message after validating it: a JSON object whose `type` is valid.
pub(crate) fn encode(message: &Value) -> Result<String, Error> {
    let ty = message
        .as_object()
        .ok_or_else(|| Error::InvalidMessage("a message must be a JSON object".into()))?
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidMessage("a message needs a string \"type\"".into()))?;
    MessageType::parse(ty).map_err(|source| Error::InvalidType {
        ty: ty.to_string(),
        source,
    })?;
    serde_json::to_string(message).map_err(|e| Error::InvalidMessage(e.to_string()))
}

/// Parses a received frame: a JSON object with a valid `type`.
fn decode(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let ty = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or("not an object with a string type")?;
    MessageType::parse(ty).map_err(|e| format!("type {ty:?}: {e}"))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encode_validates_before_sending() {
        assert!(encode(&json!({"type": "agent.pong", "n": 1})).is_ok());
        assert!(matches!(
            encode(&json!({"type": "agent"})),
            Err(Error::InvalidType { .. })
        ));
        assert!(matches!(
            encode(&json!({"type": "a^b.c"})),
            Err(Error::InvalidType { .. })
        ));
        assert!(matches!(
            encode(&json!({"kind": "a.b"})),
            Err(Error::InvalidMessage(_))
        ));
        assert!(matches!(encode(&json!([1])), Err(Error::InvalidMessage(_))));
    }

    #[test]
    fn decode_skips_garbage() {
        assert!(decode("{\"type\":\"agent.ping\"}").is_ok());
        for bad in [
            "",
            "[]",
            "{}",
            "{\"type\":1}",
            "{\"type\":\"nodot\"}",
            "nope",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn close_codes_that_stop() {
        assert!(matches!(
            stop_error(close::REVOKED, "r"),
            Some(Error::Revoked { .. })
        ));
        assert!(matches!(
            stop_error(close::SUPERSEDED, ""),
            Some(Error::Superseded { .. })
        ));
        for code in [1000, 1001, 1005, 1006, 4000, 4002] {
            assert!(stop_error(code, "").is_none(), "{code}");
        }
    }
}
