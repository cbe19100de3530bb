//! `GET /api/core/connection/events`: the connection events of every node as Server-Sent
//! Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::User;
use super::responses::Refused;
use crate::auth::functions;
use crate::error::ApiResult;
use crate::events::kinds;
use crate::metrics::Metrics;
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

/// Streams connection events of every node of the cluster as Server-Sent Events
/// (`text/event-stream`). Each event's `event:` field is its type and its `data:` a JSON
/// [`ConnectionEvent`](crate::events::ConnectionEvent): `connected`, `disconnected` (with
/// `code`, `reason`, `reasonName`), `superseded`, `heartbeat-missed`, `client-state` (with
/// `state`). The stream starts with a `ready` event; a subscriber that falls behind gets a
/// `lagged` event with the number of events it missed. Comments keep the stream alive every
/// 15 s; the stream ends when the node shuts down.
#[utoipa::path(get, path = "/api/core/connection/events", tag = "connection", security(("userToken" = [])),
    responses((status = 200, description = "An event stream (text/event-stream); each data line is a ConnectionEvent",
                content_type = "text/event-stream", body = crate::events::ConnectionEvent),
              Refused))]
async fn events(
    State(s): State<AppState>,
    user: User,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    user.require(&[functions::API])?;
    tracing::debug!(by = %user.identity.name, "event stream opened");
    let rx = s.events.subscribe();
    let sub = Subscription::new(s.metrics.clone());
    let ready = Event::default()
        .event(kinds::READY)
        .data(json!({"type": kinds::READY, "node": &*s.node_id}).to_string());
    let stop = s.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (rx, Some(ready), sub, stop),
        |(mut rx, first, sub, stop)| async move {
            if let Some(ev) = first {
                return Some((Ok(ev), (rx, None, sub, stop)));
            }
            let next = tokio::select! {
                _ = stop.cancelled() => return None,
                r = rx.recv() => r,
            };
            let ev = match next {
                Ok(text) => to_sse(&text),
                Err(RecvError::Lagged(missed)) => Event::default()
                    .event(kinds::LAGGED)
                    .data(json!({"type": kinds::LAGGED, "missed": missed}).to_string()),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(ev), (rx, None, sub, stop)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// An event published on the bus (a JSON object with a `type`) as an SSE event.
fn to_sse(text: &Arc<str>) -> Event {
    let kind = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "message".to_string());
    Event::default().event(kind).data(&**text)
}

/// Counts the subscriber while its stream lives.
struct Subscription(Arc<Metrics>);

impl Subscription {
    fn new(m: Arc<Metrics>) -> Self {
        m.subscriber(1.0);
        Self(m)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.0.subscriber(-1.0);
    }
}
