//! The bounds every request meets before a route, and the shape of every error answer after
//! it: one tower layer around the router ([`LimitsLayer`]).
//!
//! Before the route:
//! * an HTTP/1.1 request without exactly one valid `Host` gets 400 (RFC 9112 §3.2);
//! * a head (request line and header fields) over [`MAX_HEADER_BYTES`] gets 431;
//! * a declared `Content-Length` over the body limit gets 413 at once, without reading the body;
//! * a body gets a deadline ([`crate::config::Config::http_body_timeout`] from its head): missed,
//!   the request is answered 408 and the connection closed.
//!
//! After the route, an error answer that is not JSON (the framework's 405, an extractor's
//! rejection such as the 413 of a chunked body over the limit) is rewritten into the project's
//! `{"state","status":"failed","reason"}` with its status and other headers kept.
//!
//! A request without a body (every GET, the WebSocket upgrade) costs the `Host` lookup, a sum
//! over its header fields and a status check on the answer: no allocation, no timer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use axum::http::uri::Authority;
use axum::http::{HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use http_body::{Body as _, Frame, SizeHint};
use tower::{Layer, Service};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Largest request head (request line and header fields) a route sees; larger ones get 431
/// JSON. Hyper answers 431 itself, with an empty body, only past its own buffer
/// ([`crate::listener::MAX_BUF_SIZE`]) or past 100 header fields.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Largest framework error body turned into a JSON reason; longer ones are replaced by the
/// status's name.
const MAX_REASON_BYTES: usize = 1024;

/// The request bounds and error shaping around the router.
#[derive(Clone)]
pub struct LimitsLayer {
    limits: Arc<Limits>,
}

/// What [`LimitsLayer`] enforces.
pub struct Limits {
    body_limit: usize,
    body_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl LimitsLayer {
    /// `body_limit` in bytes (the router's `DefaultBodyLimit` too); `body_timeout` from the head.
    pub fn new(body_limit: usize, body_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            limits: Arc::new(Limits {
                body_limit,
                body_timeout,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitsService {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// See [`LimitsLayer`].
#[derive(Clone)]
pub struct LimitsService<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S> Service<Request> for LimitsService<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = LimitsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        if let Some((reason, error)) = check_head(&req) {
            self.limits.metrics.request_refused(reason);
            return LimitsFuture::Done {
                response: Some(error.into_response()),
            };
        }
        let timed_out = if req.body().is_end_stream() {
            None
        } else if req.body().size_hint().lower() > self.limits.body_limit as u64 {
            self.limits.metrics.request_refused("body_too_large");
            return LimitsFuture::Done {
                response: Some(too_large(self.limits.body_limit)),
            };
        } else {
            let flag = Arc::new(AtomicBool::new(false));
            let body = std::mem::take(req.body_mut());
            *req.body_mut() = Body::new(Deadline {
                inner: body,
                sleep: Box::pin(tokio::time::sleep(self.limits.body_timeout)),
                timed_out: flag.clone(),
            });
            Some(flag)
        };
        LimitsFuture::Route {
            future: self.inner.call(req),
            timed_out,
            limits: self.limits.clone(),
        }
    }
}

/// Why a request head is refused: the metric's reason and the answer.
fn check_head(req: &Request) -> Option<(&'static str, ApiError)> {
    if req.version() == Version::HTTP_11 {
        let mut hosts = req.headers().get_all(HOST).iter();
        let problem = match (hosts.next(), hosts.next()) {
            (None, _) => Some("An HTTP/1.1 request must carry a Host header."),
            (Some(_), Some(_)) => Some("A request must carry exactly one Host header."),
            (Some(h), None) if !valid_host(h) => Some("The Host header is not a valid host."),
            _ => None,
        };
        if let Some(reason) = problem {
            return Some(("no_host", ApiError::bad_request(reason)));
        }
    }
    let mut size = req.method().as_str().len()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len())
        + 12;
    for (name, value) in req.headers() {
        size += name.as_str().len() + value.len() + 4;
    }
    if size > MAX_HEADER_BYTES {
        return Some((
            "headers_too_large",
            ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "requestError",
                format!("The request head exceeds {MAX_HEADER_BYTES} bytes."),
            ),
        ));
    }
    None
}

/// An empty `Host` is valid (a target without an authority); otherwise `host[:port]`.
fn valid_host(value: &HeaderValue) -> bool {
    value.is_empty() || Authority::try_from(value.as_bytes()).is_ok_and(|a| !a.host().is_empty())
}

fn too_large(limit: usize) -> Response {
    closing(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "requestError",
        format!("The request body exceeds the limit of {limit} bytes."),
    ))
}

fn body_timed_out() -> Response {
    closing(ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        "The request body did not arrive in time.",
    ))
}

/// The answer with `Connection: close`: the rest of the body is not read.
fn closing(error: ApiError) -> Response {
    let mut res = error.into_response();
    res.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    res
}

/// The request body with a deadline: past it, the body fails (and the flag tells the layer to
/// answer 408 instead of whatever the route made of the failure).
struct Deadline {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

/// A request body that did not arrive before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                if this.sleep.as_mut().poll(cx).is_ready() {
                    this.timed_out.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(BodyTimeout.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The answer of [`LimitsService`].
    #[project = LimitsProj]
    pub enum LimitsFuture<F> {
        Done { response: Option<Response> },
        Route {
            #[pin]
            future: F,
            timed_out: Option<Arc<AtomicBool>>,
            limits: Arc<Limits>,
        },
        Shaping { future: Pin<Box<dyn Future<Output = Response> + Send>> },
    }
}

impl<F> Future for LimitsFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                LimitsProj::Done { response } => {
                    return Poll::Ready(Ok(response
                        .take()
                        .unwrap_or_else(|| ApiError::internal("answered twice").into_response())));
                }
                LimitsProj::Shaping { future } => return future.as_mut().poll(cx).map(Ok),
                LimitsProj::Route {
                    future,
                    timed_out,
                    limits,
                } => {
                    let Ok(res) = ready!(future.poll(cx));
                    if timed_out
                        .as_ref()
                        .is_some_and(|f| f.load(Ordering::Acquire))
                    {
                        limits.metrics.request_refused("body_timeout");
                        return Poll::Ready(Ok(body_timed_out()));
                    }
                    if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        limits.metrics.request_refused("body_too_large");
                    }
                    if !needs_shaping(&res) {
                        return Poll::Ready(Ok(res));
                    }
                    self.set(LimitsFuture::Shaping {
                        future: Box::pin(shape(res)),
                    });
                }
            }
        }
    }
}

/// An error answer whose body is not JSON.
fn needs_shaping(res: &Response) -> bool {
    (res.status().is_client_error() || res.status().is_server_error())
        && !res
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
}

/// The project's error JSON for a framework's error answer: same status, same headers (`Allow`
/// of a 405, for one), its text as the reason.
async fn shape(res: Response) -> Response {
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, MAX_REASON_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let reason = if text.is_empty() {
        format!(
            "{}.",
            parts.status.canonical_reason().unwrap_or("Request failed")
        )
    } else {
        text
    };
    let (json_parts, json_body) = ApiError::new(parts.status, kind(parts.status), reason)
        .into_response()
        .into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    for (name, value) in &json_parts.headers {
        parts.headers.insert(name, value.clone());
    }
    Response::from_parts(parts, json_body)
}

/// The `state` of a framework error, as the routes name theirs.
fn kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authenticationfailed",
        403 => "forbidden",
        404 => "notFound",
        408 | 504 => "timeout",
        409 => "conflict",
        503 => "unavailable",
        500..=599 => "serverError",
        _ => "requestError",
    }
}
