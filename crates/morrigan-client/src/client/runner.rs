//! The supervisor task: connects, reconnects with backoff across the provider URLs, runs each
//! accepted connection (greeting, messages both ways, token refresh) and stops gracefully.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use morrigan_protocol::close;
use morrigan_protocol::message::{Capability, TokenIssue, types};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handle::{Link, Shared};
use super::handlers::Handlers;
use super::tracked::{Answer, Delivery, Seen, answer_frame, tracked_id};
use super::{Client, Event, Sender};
use crate::Error;
use crate::backoff::{Backoff, BackoffConfig};
use crate::connect::{self, Connection, Endpoint, Incoming};
use crate::token::{TokenStore, check_token_shape, token_label};

/// How a session ended.
enum SessionEnd {
    /// Stopped on request; the client is done.
    Stopped,
    /// The connection closed; maybe reconnect.
    Closed { code: u16, reason: String },
}

/// The supervisor: owns the connection and everything the client spawned.
pub(super) struct Runner {
    /// Never empty; `current` is the one the next attempt uses.
    endpoints: Vec<Endpoint>,
    current: usize,
    store: Option<TokenStore>,
    shared: Arc<Shared>,
    handlers: Arc<Handlers>,
    capabilities: Vec<Capability>,
    backoff_config: BackoffConfig,
    backoff: Backoff,
    token_refresh: Option<Duration>,
    stop_timeout: Duration,
    write_timeout: Duration,
    stop_rx: mpsc::Receiver<String>,
    out_rx: mpsc::Receiver<String>,
    sender: Sender,
    /// The tracked message ids seen, with their answers: shared with the handler tasks, which
    /// record the answers they give.
    seen: Arc<Mutex<Seen>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// What `stop_rx` yields: a reason, or "dropped" when the handle went away.
fn stop_reason(received: Option<String>) -> String {
    received.unwrap_or_else(|| "dropped".to_string())
}

impl Runner {
    /// The supervisor of `client`, reporting to the handles through `shared`; `sender` is
    /// what handlers get, `stop_rx` carries a stop's reason, `out_rx` the queued messages.
    pub(super) fn new(
        client: Client,
        shared: Arc<Shared>,
        sender: Sender,
        stop_rx: mpsc::Receiver<String>,
        out_rx: mpsc::Receiver<String>,
    ) -> Self {
        Self {
            endpoints: client.endpoints,
            current: 0,
            store: client.store,
            shared,
            handlers: client.handlers,
            capabilities: client.capabilities,
            backoff_config: client.backoff,
            backoff: Backoff::new(client.backoff.base, client.backoff.cap),
            token_refresh: client.token_refresh,
            stop_timeout: client.stop_timeout,
            write_timeout: client.write_timeout,
            stop_rx,
            out_rx,
            sender,
            seen: Arc::new(Mutex::new(Seen::new(client.message_id_memory))),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Moves on to the next provider URL (round robin) after a failed attempt or a lost
    /// connection.
    fn next_endpoint(&mut self) {
        if self.endpoints.len() > 1 {
            self.current = (self.current + 1) % self.endpoints.len();
            tracing::info!(url = %self.endpoints[self.current].provider_url(), "next attempt uses another provider URL");
        }
    }

    pub(super) async fn run(mut self) -> Result<(), Error> {
        let result = self.supervise().await;
        match &result {
            Ok(()) => tracing::info!("client stopped"),
            Err(e) => tracing::error!(error = %e, "client stopped"),
        }
        // End every handler task before reporting the end.
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // In this order: see `Handle::subscribe`.
        self.shared.emit(Event::Stopped(result.clone()));
        self.shared.outcome.send_replace(Some(result.clone()));
        result
    }

    async fn supervise(&mut self) -> Result<(), Error> {
        loop {
            // Always the newest token: a refresh revokes the previous one, so an attempt with an
            // older one would be refused for good.
            let token = self.shared.token();
            let endpoint = self.endpoints[self.current].clone();
            let attempt = tokio::select! {
                biased;
                reason = self.stop_rx.recv() => {
                    tracing::debug!(reason = %stop_reason(reason), "stopped while connecting");
                    return Ok(());
                }
                attempt = endpoint.connect(&token) => attempt,
            };
            let mut floor = Duration::ZERO;
            match attempt {
                Ok(connection) => {
                    let since = Instant::now();
                    match self.session(connection).await {
                        SessionEnd::Stopped => return Ok(()),
                        SessionEnd::Closed { code, reason } => {
                            tracing::info!(
                                code, %reason, name = close::reason_name(code), "disconnected"
                            );
                            self.shared.emit(Event::Disconnected {
                                code,
                                reason: reason.clone(),
                            });
                            if let Some(fatal) = connect::stop_error(code, &reason) {
                                return Err(fatal);
                            }
                            if since.elapsed() >= self.backoff_config.stable_after {
                                self.backoff.reset();
                            }
                            if close::advice(code) == close::Advice::ReconnectWithJitter {
                                floor = self.backoff_config.going_away_spread;
                            }
                        }
                    }
                }
                Err(e) => {
                    self.shared.emit(Event::ConnectFailed(e.clone()));
                    if e.is_fatal() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, url = %endpoint.provider_url(), "connection attempt failed");
                }
            }
            self.next_endpoint();
            let delay = self.backoff.next_delay_with_floor(floor);
            let attempt = self.backoff.attempt();
            tracing::info!(attempt, ?delay, "reconnecting");
            self.shared.emit(Event::Reconnecting { attempt, delay });
            tokio::select! {
                biased;
                reason = self.stop_rx.recv() => {
                    tracing::debug!(reason = %stop_reason(reason), "stopped while waiting");
                    return Ok(());
                }
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&mut self, mut connection: Connection) -> SessionEnd {
        let connection_id = connection.connection_id().map(str::to_string);
        tracing::info!(connection_id = ?connection_id, url = %connection.url(), "connected");
        self.shared.link.send_replace(Link {
            connected: true,
            connection_id: connection_id.clone(),
        });
        self.shared.emit(Event::Connected { connection_id });
        let end = self.converse(&mut connection).await;
        self.shared.link.send_replace(Link::default());
        // Whatever is still queued was meant for this connection.
        let mut dropped = 0;
        while self.out_rx.try_recv().is_ok() {
            dropped += 1;
        }
        if dropped > 0 {
            tracing::debug!(dropped, "messages queued for a closed connection dropped");
        }
        match end {
            Ok(end) => end,
            Err(reason) => {
                let code = connection.close(close::NORMAL, "", self.stop_timeout).await;
                tracing::debug!(code, "server answered the close");
                self.shared.emit(Event::Disconnected {
                    code: close::NORMAL,
                    reason: format!("stopped.{reason}"),
                });
                SessionEnd::Stopped
            }
        }
    }

    /// Runs an accepted connection until it closes (`Ok`) or a stop is requested (`Err(reason)`,
    /// after `client.state stopped.<reason>` was sent; the caller closes).
    async fn converse(&mut self, connection: &mut Connection) -> Result<SessionEnd, String> {
        let mut greeting = vec![
            json!({"type": types::CLIENT_STATE, "state": "ready"}),
            json!({"type": types::CAPABILITY_REPORT, "capabilities": self.capabilities}),
        ];
        if self.token_refresh.is_some() {
            greeting.push(json!({"type": types::CLIENT_TOKEN_REFRESH}));
        }
        for message in &greeting {
            if let Err(e) = self.write(connection, message).await {
                return Ok(abnormal(e));
            }
        }
        let mut refresh = self.token_refresh.map(|every| {
            let mut interval = tokio::time::interval_at(Instant::now() + every, every);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        loop {
            // Not biased: a flood in one direction must not starve the other.
            tokio::select! {
                reason = self.stop_rx.recv() => {
                    let reason = stop_reason(reason);
                    let state = json!({"type": types::CLIENT_STATE, "state": format!("stopped.{reason}")});
                    let report = connection.send(&state);
                    match tokio::time::timeout(self.stop_timeout, report).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "could not report the stop"),
                        Err(_) => tracing::debug!("timed out reporting the stop"),
                    }
                    return Err(reason);
                }
                incoming = connection.recv() => match incoming {
                    Incoming::Message(message) => {
                        if let Err(e) = self.on_message(connection, message).await {
                            return Ok(abnormal(e));
                        }
                    }
                    Incoming::Closed { code, reason } => return Ok(SessionEnd::Closed { code, reason }),
                },
                Some(text) = self.out_rx.recv() => {
                    let write = connection.send_text(text);
                    match tokio::time::timeout(self.write_timeout, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Ok(abnormal(e)),
                        Err(_) => return Ok(abnormal(Error::Timeout("writing a message"))),
                    }
                }
                () = tick(&mut refresh) => {
                    tracing::debug!("requesting a new identity token");
                    let message = json!({"type": types::CLIENT_TOKEN_REFRESH});
                    if let Err(e) = self.write(connection, &message).await {
                        return Ok(abnormal(e));
                    }
                }
            }
        }
    }

    /// Sends a message, giving up after the write timeout: a server that stops reading must not
    /// wedge the client (it would neither see a stop request nor answer pings meanwhile).
    async fn write(&self, connection: &mut Connection, message: &Value) -> Result<(), Error> {
        tokio::time::timeout(self.write_timeout, connection.send(message))
            .await
            .unwrap_or(Err(Error::Timeout("writing a message")))
    }

    /// Dispatches a message: the built-ins the client consumes, else the handler (as a task of
    /// its own). A tracked message is answered once per id: a re-delivered id is not handled
    /// again but answered as the first time (or not at all while its handler still runs).
    /// Fails only when writing such an answer on `connection` fails.
    async fn on_message(
        &mut self,
        connection: &mut Connection,
        message: Value,
    ) -> Result<(), Error> {
        let ty = message
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match ty.as_str() {
            types::CONNECTION_STATE => {
                tracing::debug!(state = ?message.get("state"), "connection.state after accept");
            }
            types::CLIENT_TOKEN_ISSUE => self.on_token_issue(message).await,
            _ => {
                if ty == types::CONNECTION_ERROR {
                    tracing::warn!(
                        error = ?message.get("error"), reason = ?message.get("reason"),
                        message_type = ?message.get("messageType"), "server reported an error"
                    );
                }
                let id = tracked_id(&message, &ty);
                if let Some(id) = &id {
                    let delivery = self.seen().deliver(id);
                    match delivery {
                        Delivery::New => {}
                        Delivery::InProgress => {
                            tracing::debug!(%ty, message_id = %id, "re-delivered while handled");
                            return Ok(());
                        }
                        Delivery::Answered(frame) => {
                            tracing::debug!(%ty, message_id = %id, "re-delivered: answered again");
                            return self.write_text(connection, frame).await;
                        }
                    }
                }
                match self.handlers.find(&ty) {
                    Some(handler) => {
                        let run = AssertUnwindSafe(handler(message.clone(), self.sender.clone()))
                            .catch_unwind();
                        let cancel = self.cancel.clone();
                        let sender = self.sender.clone();
                        let seen = self.seen.clone();
                        self.tasks.spawn(async move {
                            let answer = tokio::select! {
                                () = cancel.cancelled() => return,
                                answer = run => answer.unwrap_or_else(|_| {
                                    Answer::Nack("handler panicked".into())
                                }),
                            };
                            let Some(id) = id else { return };
                            let frame = answer_frame(&id, answer);
                            seen.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .answered(&id, &frame);
                            // Lost with the connection, it is sent again on a re-delivery.
                            if let Err(e) = sender.send_text(frame).await {
                                tracing::debug!(message_id = %id, error = %e, "answer not sent");
                            }
                        });
                    }
                    None => match &id {
                        Some(id) => {
                            tracing::debug!(%ty, message_id = %id, "no handler: nacked");
                            let answer = Answer::Nack(format!("no handler for {ty}"));
                            let frame = answer_frame(id, answer);
                            self.seen().answered(id, &frame);
                            self.write_text(connection, frame).await?;
                        }
                        None => tracing::debug!(%ty, "no handler"),
                    },
                }
                self.shared.emit(Event::Message(message));
            }
        }
        Ok(())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes an encoded frame, bounded like [`write`](Self::write).
    async fn write_text(&self, connection: &mut Connection, text: String) -> Result<(), Error> {
        tokio::time::timeout(self.write_timeout, connection.send_text(text))
            .await
            .unwrap_or(Err(Error::Timeout("writing a message")))
    }

    async fn on_token_issue(&mut self, message: Value) {
        let issue: TokenIssue = match serde_json::from_value(message) {
            Ok(issue) => issue,
            Err(e) => {
                tracing::warn!(error = %e, "malformed client.token.issue ignored");
                return;
            }
        };
        if let Err(e) = check_token_shape(&issue.token) {
            tracing::warn!(error = %e, "client.token.issue ignored");
            return;
        }
        let label = token_label(&issue.token);
        if let Some(store) = self.store.clone() {
            let token = issue.token.clone();
            match tokio::task::spawn_blocking(move || store.save(&token)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "new identity token not saved"),
                Err(e) => tracing::error!(error = %e, "new identity token not saved"),
            }
        }
        self.shared.set_token(issue.token);
        tracing::info!(token = %label, expires = %issue.expires, "identity token refreshed");
        self.shared.emit(Event::TokenRefreshed {
            expires: issue.expires,
        });
    }
}

fn abnormal(e: Error) -> SessionEnd {
    SessionEnd::Closed {
        code: close::ABNORMAL,
        reason: e.to_string(),
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
