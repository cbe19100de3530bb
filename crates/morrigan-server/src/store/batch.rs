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

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};

use super::{Result, StoreError};

/// Requests waiting for the running batch; callers beyond this wait to enqueue.
const QUEUE: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T>>;
type BatchFuture<T> = Pin<Box<dyn Future<Output = Result<Vec<T>>> + Send>>;

/// Runs requests of type `Req` in batches of at most `max` through one function that answers
/// each request of a batch, in order.
pub(crate) struct Batcher<Req, Resp> {
    tx: mpsc::Sender<(Req, Reply<Resp>)>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Spawns the batch task. It ends when the last `Batcher` clone is dropped. `run` must
    /// return exactly one answer per request, in request order.
    pub(crate) fn spawn<F>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> BatchFuture<Resp> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(Req, Reply<Resp>)>(QUEUE);
        tokio::spawn(async move {
            let mut queued = Vec::with_capacity(max);
            while rx.recv_many(&mut queued, max).await > 0 {
                let (requests, replies): (Vec<Req>, Vec<Reply<Resp>>) = queued.drain(..).unzip();
                let count = requests.len();
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
        Self { tx }
    }

    /// Queues `request` and waits for its answer.
    pub(crate) async fn call(&self, request: Req) -> Result<Resp> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((request, reply))
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
        let batcher = Batcher::spawn(8, move |reqs: Vec<u32>| {
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
    async fn a_failed_batch_fails_every_caller_in_it() {
        let batcher = Batcher::spawn(4, |_reqs: Vec<u32>| {
            Box::pin(async { Err::<Vec<u32>, _>(StoreError::Database("boom".into())) })
        });
        let err = batcher.call(1).await.err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("database error: boom"));
    }
}
