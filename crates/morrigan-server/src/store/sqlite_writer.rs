//! SQLite's writer thread for the message path: one thread owns one connection and runs every
//! batch queued since its last round in one transaction.
//!
//! Why a thread of our own. Through sqlx, each statement is a round trip to the connection's
//! worker thread (a channel send, a thread wake-up, one more per returned row, and the wake-up
//! back), and each batch was a commit of its own: a tracked send's insert and its device's
//! answer were two commits, each with its WAL append, in series on the send's round trip. perf
//! put a third of an acked send's CPU in that worker and the scheduler around it. Here a round
//! costs one wake-up and one commit whatever it holds: the insert batch, the answer batch and
//! the written marks that queued meanwhile share them, and each statement is a prepared one
//! run in place.
//!
//! The guarantees are the batches' (see [`super::batch`]): every caller waits for its own
//! answer, given only after the round's commit; a job whose caller is gone is dropped unrun;
//! one that waited for the thread longer than [`Deadline::acquire`] is answered
//! [`StoreError::Timeout`] unrun; the write lock is waited for at most [`Deadline::statement`]
//! (the busy timeout). Each job is one statement, which SQLite applies whole or not at all, so
//! one that fails leaves nothing behind and the rest of its round still commits. Jobs are
//! applied in the order they were queued, across rounds too.
//!
//! The thread also copies the write-ahead log back into the database ([`Writer::checkpoint`]),
//! between two rounds. SQLite starts the log over from its beginning only when a write finds
//! every frame of it copied back, and a checkpoint run on another connection while this thread
//! appends never catches up with it: under a steady stream of messages the log would grow for
//! as long as the stream lasts. Between rounds this thread appends nothing, the checkpoint can
//! copy the whole log, and the next round starts it over.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::{Deadline, Result, StoreError};

/// Jobs queued for the thread; each Batcher has at most one in flight, so this is never full.
const QUEUE: usize = 64;
/// Most jobs per round (transaction).
const ROUND_JOBS: usize = 64;
/// Prepared statements kept: every statement the jobs run, with room.
const STATEMENT_CACHE: usize = 64;
/// The writer's page cache, in KiB (SQLite's default is 2 MiB): the pages of the tables and
/// indexes it writes stay in memory rather than being read back from the file at each insert.
const CACHE_KIB: i64 = 32 * 1024;

/// A handle to the writer thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Work>,
    deadline: Deadline,
}

/// What the thread is given.
enum Work {
    Job(Box<dyn Job>),
    /// Copy the log back after the round in progress (see [`Writer::checkpoint`]).
    Checkpoint(oneshot::Sender<Result<bool>>),
}

impl Writer {
    /// Starts the thread for the database file at `path` (already created and migrated). The
    /// connection opens lazily and again after a failed round, so a database that was not
    /// writable for a while (its file made read-only) is written again once it is.
    pub(crate) fn spawn(path: &Path, deadline: Deadline) -> Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread = Thread {
            path: path.to_path_buf(),
            deadline,
            conn: None,
        };
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || thread.run(rx))
            .map_err(|e| StoreError::Database(format!("could not start the writer: {e}")))?;
        Ok(Self { tx, deadline })
    }

    /// Runs `f`, which runs one statement, in the writer's next round, and answers once that
    /// round committed: `f`'s result, or the round's error (then nothing `f` wrote was kept).
    /// One statement, because SQLite applies a statement whole or not at all: a job that fails
    /// leaves nothing behind while the rest of its round commits.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        self.enqueue(f, false).await?.await
    }

    /// Queues `f` (as for [`Writer::call`]) and returns once it is queued: every job queued
    /// after this returns is applied after it. The returned future answers as
    /// [`Writer::call`] does, by the store deadline at the latest. Unlike a call's, the job
    /// runs even if that future is dropped: its caller may already have acted on it (a frame
    /// left whose answer must find the record).
    pub(crate) async fn queue<R, F>(
        &self,
        f: F,
    ) -> Result<impl Future<Output = Result<R>> + Send + 'static>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        self.enqueue(f, true).await
    }

    async fn enqueue<R, F>(
        &self,
        f: F,
        kept: bool,
    ) -> Result<impl Future<Output = Result<R>> + Send + 'static>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Call {
            f: Some(f),
            out: None,
            reply,
            kept,
            start_by: Instant::now() + self.deadline.acquire(),
        };
        self.tx
            .send(Work::Job(Box::new(job)))
            .await
            .map_err(|_| stopped())?;
        Ok(self.answer(answer))
    }

    /// Copies the write-ahead log back into the database once the round in progress has
    /// committed, without waiting for any other connection (`PASSIVE`): `true` if the whole log
    /// was copied, so that the next round starts it over. Run periodically (see `sqlite.rs`).
    pub(crate) async fn checkpoint(&self) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Work::Checkpoint(reply))
            .await
            .map_err(|_| stopped())?;
        self.answer(answer).await
    }

    /// The answer to a job, waited for by the store deadline at the latest.
    fn answer<R>(
        &self,
        answer: oneshot::Receiver<Result<R>>,
    ) -> impl Future<Output = Result<R>> + Send + 'static
    where
        R: Send + 'static,
    {
        let limit = self.deadline.call();
        async move {
            match tokio::time::timeout(limit, answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(stopped()),
                Err(_) => Err(StoreError::Timeout(limit)),
            }
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Database("the store's writer has stopped".into())
}

/// One caller's work in a round.
trait Job: Send {
    /// The caller gave up: run nothing.
    fn abandoned(&self) -> bool;
    /// When the job must have started by.
    fn start_by(&self) -> Instant;
    /// Runs inside the round's transaction.
    fn run(&mut self, conn: &Connection);
    /// Answers the caller: with the job's result if `round` committed, else with its error.
    fn finish(self: Box<Self>, round: Result<()>);
}

struct Call<R, F> {
    f: Option<F>,
    out: Option<Result<R>>,
    reply: oneshot::Sender<Result<R>>,
    /// Runs even once its caller is gone (see [`Writer::queue`]).
    kept: bool,
    start_by: Instant,
}

impl<R, F> Job for Call<R, F>
where
    R: Send + 'static,
    F: FnOnce(&Connection) -> Result<R> + Send + 'static,
{
    fn abandoned(&self) -> bool {
        !self.kept && self.reply.is_closed()
    }

    fn start_by(&self) -> Instant {
        self.start_by
    }

    fn run(&mut self, conn: &Connection) {
        if let Some(f) = self.f.take() {
            self.out = Some(f(conn));
        }
    }

    fn finish(self: Box<Self>, round: Result<()>) {
        let answer = match (round, self.out) {
            (Ok(()), Some(out)) => out,
            (Ok(()), None) => Err(StoreError::Database("the job did not run".into())),
            (Err(e), _) => Err(e),
        };
        let _ = self.reply.send(answer);
    }
}

struct Thread {
    path: PathBuf,
    deadline: Deadline,
    conn: Option<Connection>,
}

impl Thread {
    fn run(mut self, mut rx: mpsc::Receiver<Work>) {
        let mut jobs = Vec::with_capacity(ROUND_JOBS);
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            let mut checkpoint = None;
            while let Some(work) = next {
                match work {
                    Work::Job(job) => jobs.push(job),
                    Work::Checkpoint(reply) => {
                        // Jobs queued after it wait for it: the round ends here.
                        checkpoint = Some(reply);
                        break;
                    }
                }
                next = if jobs.len() < ROUND_JOBS {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            self.round(&mut jobs);
            if let Some(reply) = checkpoint {
                let _ = reply.send(self.checkpoint());
            }
        }
    }

    /// The connection, opened if it is not (see [`Writer::spawn`]).
    fn connection(&mut self) -> Result<&Connection> {
        if self.conn.is_none() {
            self.conn = Some(open(&self.path, self.deadline.statement()).map_err(sqlite)?);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::Database("no writer connection".into()))
    }

    /// Copies the log back between two rounds (see the module's doc).
    fn checkpoint(&mut self) -> Result<bool> {
        let conn = self.connection()?;
        let (busy, log, copied) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(sqlite)?;
        Ok(busy == 0 && log == copied)
    }

    /// Runs the queued jobs in one transaction and answers each.
    fn round(&mut self, jobs: &mut Vec<Box<dyn Job>>) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            if job.abandoned() {
                continue;
            }
            if job.start_by() < now {
                job.finish(Err(StoreError::Timeout(self.deadline.call())));
                continue;
            }
            live.push(job);
        }
        if live.is_empty() {
            return;
        }
        let result = self.transaction(&mut live);
        if result.is_err() {
            // Opened again for the next round (see `Writer::spawn`).
            self.conn = None;
        }
        for job in live {
            job.finish(result.clone());
        }
    }

    fn transaction(&mut self, jobs: &mut [Box<dyn Job>]) -> Result<()> {
        let conn = self.connection()?;
        conn.execute_batch("BEGIN IMMEDIATE").map_err(sqlite)?;
        for job in jobs.iter_mut() {
            job.run(conn);
        }
        if let Err(e) = conn.execute_batch("COMMIT") {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(sqlite(e));
        }
        Ok(())
    }
}

/// Opens the writer's connection with the pool's settings (see `sqlite.rs`).
fn open(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
         PRAGMA foreign_keys = OFF; PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -{CACHE_KIB};"
    ))?;
    Ok(conn)
}

/// Maps a SQLite error; unique violations (of a key or an index) become
/// [`StoreError::Conflict`], as [`super::sql::db`] maps sqlx's.
pub(crate) fn sqlite(e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi::{SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE};
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && matches!(
            f.extended_code,
            SQLITE_CONSTRAINT_UNIQUE | SQLITE_CONSTRAINT_PRIMARYKEY
        )
    {
        return StoreError::Conflict(e.to_string());
    }
    StoreError::Database(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &tempfile::TempDir) -> Writer {
        let path = dir.path().join("w.db");
        let conn = open(&path, Duration::from_secs(1)).expect("open");
        conn.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .expect("create");
        Writer::spawn(&path, Deadline::DEFAULT).expect("spawn")
    }

    fn count(dir: &tempfile::TempDir) -> i64 {
        let conn = open(&dir.path().join("w.db"), Duration::from_secs(1)).expect("open");
        conn.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .expect("count")
    }

    #[tokio::test]
    async fn a_failed_job_fails_alone_and_jobs_apply_in_queue_order() {
        let dir = tempfile::tempdir().expect("dir");
        let w = writer(&dir);
        // Two rows in one statement: the duplicate's statement fails whole.
        let insert = |k: &'static str| {
            w.queue(move |c| {
                c.execute("INSERT INTO t (k) VALUES ('a-' || ?1), (?1)", [k])
                    .map_err(sqlite)
            })
        };
        let one = insert("1").await.expect("queued");
        let dup = insert("1").await.expect("queued");
        let two = insert("2").await.expect("queued");
        // Queued after the first insert: sees it, whichever round each ran in.
        let seen = w
            .queue(|c| {
                c.query_row("SELECT COUNT(*) FROM t WHERE k = '1'", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(sqlite)
            })
            .await
            .expect("queued");
        assert_eq!(one.await.ok(), Some(2));
        let dup = dup.await;
        assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
        assert_eq!(two.await.ok(), Some(2));
        assert_eq!(seen.await.ok(), Some(1));
        assert_eq!(count(&dir), 4);
    }

    #[tokio::test]
    async fn a_call_whose_caller_gave_up_is_never_run_a_queued_job_is() {
        let dir = tempfile::tempdir().expect("dir");
        let w = writer(&dir);
        // Holds the thread while the second call is abandoned.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        let first = tokio::spawn({
            let w = w.clone();
            async move {
                w.call(move |_| {
                    let _ = started.send(());
                    let _ = released.recv();
                    Ok(())
                })
                .await
            }
        });
        let _ = running.await;
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            w.call(|c| {
                c.execute("INSERT INTO t (k) VALUES ('late')", [])
                    .map_err(sqlite)
            }),
        )
        .await;
        assert!(gave_up.is_err());
        // A queued job runs even if its caller drops the answer: it may have acted on it.
        let queued = w
            .queue(|c| {
                c.execute("INSERT INTO t (k) VALUES ('kept')", [])
                    .map_err(sqlite)
            })
            .await
            .expect("queued");
        drop(queued);
        let _ = release.send(());
        assert!(first.await.is_ok_and(|r| r.is_ok()));
        let after = w
            .call(|c| {
                c.execute("INSERT INTO t (k) VALUES ('next')", [])
                    .map_err(sqlite)
            })
            .await;
        assert_eq!(after.ok(), Some(1));
        let rows = {
            let conn = open(&dir.path().join("w.db"), Duration::from_secs(1)).expect("open");
            let mut stmt = conn.prepare("SELECT k FROM t ORDER BY k").expect("prepare");
            stmt.query_map([], |r| r.get::<_, String>(0))
                .expect("query")
                .collect::<rusqlite::Result<Vec<_>>>()
                .expect("rows")
        };
        assert_eq!(rows, ["kept", "next"]);
    }
}
