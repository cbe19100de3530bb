//! Accepting and serving connections: the caps that refuse a socket early, and the bound on
//! how long a connection may hold a socket without sending a request.
//!
//! **Caps.** Every accepted TCP socket takes a slot of two counts before anything is read from
//! it: *sockets* (every socket the node holds, HTTP or WebSocket), capped at the process's file
//! limit minus [`Config::fd_reserve`], and *HTTP* (connections not yet upgraded to a
//! WebSocket), capped at [`Config::max_http_connections`]. Past either cap the socket is closed
//! as soon as it is accepted (and counted in `morrigan_http_connections_refused_total`), so the
//! node never reaches its file limit: connected devices keep their sockets, the store keeps its
//! files, and the process never meets `EMFILE` on accept.
//!
//! The socket slot travels with the socket ([`Counted`]): it is released when the socket is
//! closed, whoever holds it then (hyper, or the WebSocket session after an upgrade). The HTTP
//! slot is held by the connection's task and released when hyper's connection future ends:
//! the connection closed, or it upgraded and the socket now belongs to a WebSocket session,
//! whose heartbeat bounds it. An upgraded socket therefore leaves the HTTP count at the upgrade
//! and stays in the socket count until it is closed.
//!
//! **Time.** Connections are served by hyper's HTTP/1.1 connection directly (no protocol
//! sniffing, which would wait for a first byte without a bound and would also accept HTTP/2).
//! Hyper's header-read timer runs whenever the connection waits for a request head: from the
//! accept (or the end of the TLS handshake, which has the same bound) and from the end of each
//! response. So one bound, [`Config::http_idle_timeout`], closes a silent socket, an idle
//! keep-alive connection and a slow header block alike, with one timer per waiting connection
//! and nothing per read. A request in flight (an event stream) is not waiting for a head and is
//! not cut. An upgraded socket is no longer hyper's: it pays nothing here (its reads go through
//! [`Counted`], which only forwards them).
//!
//! A response the peer does not read is bounded too: [`Counted`] notes when a write starts
//! waiting on the peer, and a connection whose write has waited longer than the write timeout
//! is closed (`morrigan_http_connections_cut_total{reason="write_timeout"}`). An event stream
//! waiting for its next event is not writing, so it is not cut.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower_http::normalize_path::NormalizePath;

use crate::config::Config;
use crate::metrics::Metrics;

/// Largest buffered request head (and start of body) hyper keeps; past it hyper itself answers
/// 431 with an empty body. Smaller header blocks are bounded with a JSON answer by
/// [`crate::routes::limits`].
pub const MAX_BUF_SIZE: usize = 64 * 1024;

/// Why a node cannot start with its file limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "the process may open {limit} files, which leaves no sockets after the reserve of {reserve} \
     (raise `ulimit -n` or lower --fd-reserve)"
)]
pub struct FdLimitError {
    pub limit: usize,
    pub reserve: usize,
}

/// The node's two socket counts and their caps (see the module documentation).
pub struct Admission {
    http: AtomicUsize,
    sockets: AtomicUsize,
    max_http: usize,
    max_sockets: usize,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// Raises the soft file limit to the hard one and derives the socket cap from it.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, FdLimitError> {
        let max_sockets = match raise_fd_limit() {
            Some(limit) => match limit.checked_sub(config.fd_reserve) {
                Some(n) if n > 0 => n,
                _ => {
                    return Err(FdLimitError {
                        limit,
                        reserve: config.fd_reserve,
                    });
                }
            },
            None => usize::MAX,
        };
        Ok(Arc::new(Self {
            http: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            max_http: config.max_http_connections.max(1),
            max_sockets,
            metrics,
        }))
    }

    /// Connections not (yet) upgraded to a WebSocket, TLS handshakes included.
    pub fn http_connections(&self) -> usize {
        self.http.load(Ordering::Relaxed)
    }

    /// Every socket held: HTTP connections and WebSockets.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    /// The cap on [`Self::http_connections`].
    pub fn max_http_connections(&self) -> usize {
        self.max_http
    }

    /// The cap on [`Self::sockets`] (`usize::MAX` where the file limit is unknown).
    pub fn max_sockets(&self) -> usize {
        self.max_sockets
    }

    /// A slot of each count for a socket just accepted, or `None` (counted) past a cap: the
    /// caller then drops the socket, which closes it.
    pub fn admit(self: &Arc<Self>) -> Option<Permit> {
        if self.sockets.fetch_add(1, Ordering::AcqRel) >= self.max_sockets {
            self.sockets.fetch_sub(1, Ordering::AcqRel);
            self.metrics.connection_refused("socket_limit");
            return None;
        }
        let socket = SocketSlot(self.clone());
        if self.http.fetch_add(1, Ordering::AcqRel) >= self.max_http {
            self.http.fetch_sub(1, Ordering::AcqRel);
            self.metrics.connection_refused("http_limit");
            return None;
        }
        Some(Permit {
            http: HttpSlot(self.clone()),
            socket,
        })
    }
}

/// The two slots of an admitted socket.
pub struct Permit {
    http: HttpSlot,
    socket: SocketSlot,
}

/// A place in the HTTP count, released on drop.
struct HttpSlot(Arc<Admission>);

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.0.http.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in the socket count, released on drop.
struct SocketSlot(Arc<Admission>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that holds its place in the socket count until it is dropped (closed). Reads and
/// writes are forwarded unchanged; a write that waits on the peer is noted in [`Stall`].
pub struct Counted<T> {
    io: T,
    _slot: SocketSlot,
    stall: Arc<Stall>,
}

/// Since when a write to a socket has been waiting on its peer (milliseconds on the process's
/// monotonic clock, 0 when no write waits).
#[derive(Default)]
struct Stall {
    since_ms: AtomicU64,
}

fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    // Never 0, which means "not waiting".
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Stall {
    #[inline]
    fn note<T>(&self, poll: &Poll<T>) {
        match poll {
            Poll::Pending => {
                if self.since_ms.load(Ordering::Relaxed) == 0 {
                    self.since_ms.store(monotonic_ms(), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {
                if self.since_ms.load(Ordering::Relaxed) != 0 {
                    self.since_ms.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// How long the current write has waited, if one does.
    fn waited(&self) -> Option<Duration> {
        match self.since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(monotonic_ms().saturating_sub(since))),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.stall.note(&poll);
        poll
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.stall.note(&poll);
        poll
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.stall.note(&poll);
        poll
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force, or
/// `None` if it is unknown or unlimited.
#[cfg(unix)]
fn raise_fd_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, local `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the valid, local `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX))
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<usize> {
    None
}

/// Tells every served connection to finish gracefully, and waits until they have: hyper closes
/// an idle connection at once and lets a request in flight complete. (hyper-util's
/// `GracefulShutdown` does the same but cannot watch hyper's upgradeable HTTP/1 connection.)
pub struct Graceful {
    tx: watch::Sender<()>,
}

impl Default for Graceful {
    fn default() -> Self {
        Self::new()
    }
}

impl Graceful {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(()).0,
        }
    }

    /// What one connection watches.
    pub fn watcher(&self) -> watch::Receiver<()> {
        self.tx.subscribe()
    }

    /// Signals every connection, then waits until each has ended (or upgraded).
    pub async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// Serves admitted sockets: TLS (if configured), then HTTP/1.1 with upgrades.
pub struct Serving {
    http: http1::Builder,
    service: NormalizePath<Router>,
    tls: Option<TlsAcceptor>,
    idle: Duration,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Serving {
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        service: NormalizePath<Router>,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.http_idle_timeout)
            .max_buf_size(MAX_BUF_SIZE);
        Self {
            http,
            service,
            tls,
            idle: config.http_idle_timeout,
            write_timeout: config.effective_write_timeout(),
            metrics,
        }
    }

    /// Serves one admitted socket on its own task, until it closes or upgrades. `shutdown` is
    /// held until then, so [`Graceful::shutdown`] waits for it.
    pub fn spawn(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: Permit,
        mut shutdown: watch::Receiver<()>,
    ) {
        let _ = stream.set_nodelay(true);
        let Permit { http: slot, socket } = permit;
        let stall = Arc::new(Stall::default());
        let io = Counted {
            io: stream,
            _slot: socket,
            stall: stall.clone(),
        };
        let watch = StallWatch {
            stall,
            limit: self.write_timeout,
        };
        let service = self.service.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            service.clone().oneshot(req)
        });
        let http = self.http.clone();
        let metrics = self.metrics.clone();
        match &self.tls {
            None => {
                let conn = http.serve_connection(TokioIo::new(io), svc).with_upgrades();
                tokio::spawn(serve(conn, shutdown, slot, watch, metrics));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let idle = self.idle;
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(idle, acceptor.accept(io));
                    let stream = tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                metrics.connection_cut("tls_handshake");
                                return;
                            }
                        },
                        _ = shutdown.changed() => return,
                    };
                    let conn = http
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    serve(conn, shutdown, slot, watch, metrics).await;
                });
            }
        }
    }
}

/// Watches one HTTP connection's writes (see [`Stall`]).
struct StallWatch {
    stall: Arc<Stall>,
    limit: Duration,
}

impl StallWatch {
    /// Resolves once a write has waited on the peer for longer than the limit.
    async fn stalled(&self) {
        let mut tick = tokio::time::interval((self.limit / 4).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.stall.waited().is_some_and(|w| w > self.limit) {
                return;
            }
        }
    }
}

/// Drives one HTTP/1.1 connection to its end (or its upgrade), finishing gracefully when
/// `shutdown` changes and dropping it when a response write waits on the peer for longer than
/// the write timeout. The HTTP slot is released when it returns.
async fn serve<I, S, B>(
    conn: http1::UpgradeableConnection<I, S>,
    mut shutdown: watch::Receiver<()>,
    slot: HttpSlot,
    stall: StallWatch,
    metrics: Arc<Metrics>,
) where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stall.stalled() => {
            metrics.connection_cut("write_timeout");
            return;
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = stall.stalled() => {
                    metrics.connection_cut("write_timeout");
                    return;
                }
            }
        }
    };
    drop(slot);
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => metrics.connection_cut("idle"),
        Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
    }
}

/// Accepts connections until `shutdown` resolves: each admitted socket is served on its own
/// task; past a cap the socket is dropped (closed) at once, before anything is read from it.
pub async fn accept_until(
    listener: TcpListener,
    admission: &Arc<Admission>,
    serving: &Serving,
    graceful: &Graceful,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, mostly: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        if let Some(permit) = admission.admit() {
            serving.spawn(stream, peer, permit, graceful.watcher());
        }
    }
}
