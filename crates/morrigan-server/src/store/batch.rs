//! Group commit for the connection hot path.
//!
//! A connect writes the store three times (the pending record at token exchange, the accept,
//! the close). Run one by one, each write is a round trip: to sqlx-sqlite's worker thread (two
//! thread wake-ups and a WAL append per statement; perf showed 44 % of a churning node's CPU in
//! those threads and another third in the kernel switching to and from them) or to PostgreSQL.
//! A [`Batcher`] instead queues the requests of concurrent callers and runs them as one
//! multi-row statement, so under load the round trip is shared by every connect in flight and
//! with one caller it costs one task hop more than a direct call.
//!
//! Each caller still waits for its own result: nothing is acknowledged before it is written.
//! And nothing is written after its caller gave up: a request whose caller is gone (its call
//! timed out) is dropped before its batch runs, and one with too little of its deadline left
//! to finish ([`Deadline::started_bound`]) is answered [`StoreError::Timeout`] unrun.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Deadline, Result, StoreError};

/// Requests waiting for the running batch; callers beyond this wait to enqueue.
const QUEUE: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T>>;
/// A request, the instant its caller's store deadline passes, and where its answer goes.
type Queued<Req, Resp> = (Req, Instant, Reply<Resp>);
type BatchFuture<T> = Pin<Box<dyn Future<Output = Result<Vec<T>>> + Send>>;

/// Runs requests of type `Req` in batches of at most `max` through one function that answers
/// each request of a batch, in order.
pub(crate) struct Batcher<Req, Resp> {
    tx: mpsc::Sender<Queued<Req, Resp>>,
    deadline: Deadline,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            deadline: self.deadline,
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Spawns the batch task. It ends when the last `Batcher` clone is dropped. `run` must
    /// return exactly one answer per request, in request order, and give up within
    /// `deadline.started_bound()` (the backend's acquire and statement timeouts).
    pub(crate) fn spawn<F>(max: usize, deadline: Deadline, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> BatchFuture<Resp> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Queued<Req, Resp>>(QUEUE);
        tokio::spawn(async move {
            let mut queued = Vec::with_capacity(max);
            while rx.recv_many(&mut queued, max).await > 0 {
                let latest_start = Instant::now() + deadline.started_bound();
                let mut requests = Vec::with_capacity(queued.len());
                let mut replies = Vec::with_capacity(queued.len());
                for (request, until, reply) in queued.drain(..) {
                    if reply.is_closed() {
                        continue;
                    }
                    if until < latest_start {
                        let _ = reply.send(Err(StoreError::Timeout(deadline.call())));
                        continue;
                    }
                    requests.push(request);
                    replies.push(reply);
                }
                let count = requests.len();
                if count == 0 {
                    continue;
                }
                match run(requests).await {
                    Ok(answers) if answers.len() == count => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Ok(answers) => {
                        let e = format!("batch of {count} got {} answers", answers.len());
                        for reply in replies {
                            let _ = reply.send(Err(StoreError::Database(e.clone())));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { tx, deadline }
    }

    /// Queues `request` and waits for its answer. The request counts as given up once the store
    /// deadline has passed since this call (the caller's own deadline, which `MeteredStore`
    /// enforces, started a moment earlier).
    pub(crate) async fn call(&self, request: Req) -> Result<Resp> {
        let (reply, answer) = oneshot::channel();
        let until = Instant::now() + self.deadline.call();
        self.tx
            .send((request, until, reply))
            .await
            .map_err(|_| StoreError::Database("the store's batch writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Database("the store's batch writer has stopped".into()))?
    }
}

/// Builds `(…, …), (…, …)` for `rows` rows of `cols` placeholders each, the `VALUES` list of a
/// multi-row statement: `$1`, `$2`… when `numbered` (PostgreSQL), else anonymous `?` (SQLite,
/// where sqlx looks every `$n` up by name, a linear scan in SQLite: O(n²) per statement, 5 % of
/// an idle node's CPU with 600 parameters; anonymous ones are bound by position).
/// Only placeholders are interpolated; every value is bound.
pub(crate) fn values_list(rows: usize, cols: usize, numbered: bool) -> String {
    let mut sql = String::with_capacity(rows * cols * 6);
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            if numbered {
                sql.push('$');
                sql.push_str(&(r * cols + c + 1).to_string());
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_list_numbers_rows_then_columns() {
        assert_eq!(values_list(1, 1, true), "($1)");
        assert_eq!(values_list(2, 3, true), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values_list(2, 2, false), "(?, ?), (?, ?)");
    }

    #[tokio::test]
    async fn concurrent_callers_share_batches_and_get_their_own_answers() {
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Batcher::spawn(8, Deadline::DEFAULT, move |reqs: Vec<u32>| {
            seen.lock().map(|mut s| s.push(reqs.len())).ok();
            Box::pin(async move {
                tokio::task::yield_now().await;
                Ok(reqs.into_iter().map(|r| r * 2).collect())
            })
        });
        let calls = (0..100u32).map(|i| {
            let b = batcher.clone();
            async move { (i, b.call(i).await) }
        });
        for (i, answer) in futures_util::future::join_all(calls).await {
            assert_eq!(answer.ok(), Some(i * 2));
        }
        let sizes = sizes.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(sizes.iter().sum::<usize>(), 100);
        assert!(sizes.iter().all(|&n| n <= 8));
        assert!(sizes.len() < 100, "no batching happened: {sizes:?}");
    }

    #[tokio::test]
    async fn a_request_whose_caller_gave_up_is_never_run() {
        let ran = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ran.clone();
        let (release, released) = tokio::sync::watch::channel(false);
        let batcher = Batcher::spawn(1, Deadline::DEFAULT, move |reqs: Vec<u32>| {
            seen.lock().map(|mut r| r.extend(reqs.iter().copied())).ok();
            let mut released = released.clone();
            Box::pin(async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(reqs)
            })
        });
        // The first request holds the batch task; the second gives up while it waits.
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        while ran.lock().map(|r| r.is_empty()).unwrap_or(false) {
            tokio::task::yield_now().await;
        }
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(20), batcher.call(2)).await;
        assert!(gave_up.is_err());
        let _ = release.send(true);
        assert_eq!(first.await.ok().and_then(|r| r.ok()), Some(1));
        assert_eq!(batcher.call(3).await.ok(), Some(3));
        assert_eq!(
            ran.lock().map(|r| r.clone()).unwrap_or_default(),
            vec![1, 3]
        );
    }

    #[tokio::test]
    async fn a_request_left_with_too_little_time_is_answered_timeout_unrun() {
        let ran = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ran.clone();
        let deadline = Deadline(std::time::Duration::from_millis(400));
        let batcher = Batcher::spawn(1, deadline, move |reqs: Vec<u32>| {
            seen.lock().map(|mut r| r.extend(reqs.iter().copied())).ok();
            Box::pin(async move {
                // Longer than a quarter of the deadline: the request queued behind this one
                // has less than `started_bound` left when its turn comes.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Ok(reqs)
            })
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        while ran.lock().map(|r| r.is_empty()).unwrap_or(false) {
            tokio::task::yield_now().await;
        }
        let second = batcher.call(2).await;
        assert!(matches!(second, Err(StoreError::Timeout(_))), "{second:?}");
        assert_eq!(first.await.ok().and_then(|r| r.ok()), Some(1));
        assert_eq!(ran.lock().map(|r| r.clone()).unwrap_or_default(), vec![1]);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_caller_in_it() {
        let batcher = Batcher::spawn(4, Deadline::DEFAULT, |_reqs: Vec<u32>| {
            Box::pin(async { Err::<Vec<u32>, _>(StoreError::Database("boom".into())) })
        });
        let err = batcher.call(1).await.err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("database error: boom"));
    }
}
