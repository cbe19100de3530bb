//! Password hashing (argon2id) with bounded concurrency and bounded memory.
//!
//! Every argon2 computation of the server (a login's verification, including the one against
//! no hash for an unknown name, an identity's creation, a password change, the first admin)
//! runs on one of [`WORKERS`] threads owned by [`Passwords`]. A caller first takes one of
//! [`WORKERS`] slots: at most [`MAX_WAITING`] callers wait for one, each at most [`MAX_WAIT`];
//! anyone else is told at once that the node is busy ([`HashError::Busy`]: 503 with
//! `Retry-After`). So a burst of logins costs at most [`WORKERS`] hashes at a time, whatever
//! its size.
//!
//! Each worker keeps one argon2 block buffer (`m_cost` KiB, 19 MiB with the default cost),
//! allocated on its first job and reused for every later one, so the memory spent on hashing
//! is at most `WORKERS × 19 MiB` for the life of the node and never grows with the load. (A
//! buffer allocated per hash, on whichever threads ran them, would leave a freed 19 MiB block
//! cached in each of those threads' malloc arenas.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::ApiError;

/// Hashing threads: the most argon2 computations running at once on a node.
pub const WORKERS: usize = 2;
/// Callers allowed to wait for a worker; more are answered busy at once.
pub const MAX_WAITING: usize = 32;
/// How long a caller waits for a worker before it is answered busy.
pub const MAX_WAIT: Duration = Duration::from_secs(2);
/// The `Retry-After` (seconds) of a busy answer.
pub const BUSY_RETRY_AFTER: u64 = 1;
/// The largest block buffer a worker allocates (a stored hash asking for more is refused):
/// 64 MiB, three times the default cost.
const MAX_BLOCKS: usize = 64 * 1024;

/// Why a password could not be hashed or checked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HashError {
    /// Every worker is taken and the wait is full or took too long.
    #[error("too many password checks in progress")]
    Busy,
    /// The hash could not be computed (a malformed stored hash, the workers are gone).
    #[error("password hashing failed: {0}")]
    Failed(String),
}

impl From<HashError> for ApiError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => ApiError::unavailable(format!(
                "Too many logins in progress; retry in {BUSY_RETRY_AFTER} s."
            ))
            .retry_after(BUSY_RETRY_AFTER),
            HashError::Failed(reason) => {
                tracing::error!(%reason, "password hashing failed");
                ApiError::internal("could not check the password")
            }
        }
    }
}

enum Job {
    /// A new PHC string for `password`.
    Hash {
        password: String,
        reply: oneshot::Sender<Result<String, HashError>>,
    },
    /// Whether `password` matches `hash`; with no hash, the same work against a fixed salt,
    /// and `false` (an unknown name costs what a wrong password costs).
    Verify {
        password: String,
        hash: Option<String>,
        reply: oneshot::Sender<Result<bool, HashError>>,
    },
}

/// The node's password hashers (see the module documentation).
pub struct Passwords {
    jobs: SyncSender<(Job, OwnedSemaphorePermit)>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Passwords {
    /// Starts the [`WORKERS`] threads; they end when this is dropped.
    pub fn start() -> Result<Arc<Self>, std::io::Error> {
        let (jobs, rx) = std::sync::mpsc::sync_channel(WORKERS);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..WORKERS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("morrigan-argon2-{n}"))
                .spawn(move || work(&rx))?;
        }
        Ok(Arc::new(Self {
            jobs,
            slots: Arc::new(Semaphore::new(WORKERS)),
            waiting: AtomicUsize::new(0),
        }))
    }

    /// A new argon2id PHC string (default cost, random salt) for `password`.
    pub async fn hash(&self, password: &str) -> Result<String, HashError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Hash {
            password: password.to_string(),
            reply,
        };
        self.run(job, rx).await?
    }

    /// Whether `password` matches the PHC string `hash`, in constant time. With `None` (an
    /// unknown name) the same work is done and the answer is `false`.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, HashError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Verify {
            password: password.to_string(),
            hash: hash.map(str::to_string),
            reply,
        };
        self.run(job, rx).await?
    }

    async fn run<T>(&self, job: Job, rx: oneshot::Receiver<T>) -> Result<T, HashError> {
        let permit = self.slot().await?;
        match self.jobs.try_send((job, permit)) {
            Ok(()) => {}
            // A slot is held until its job is done, so the channel (one place per worker)
            // is never full; both arms are defensive.
            Err(TrySendError::Full(_)) => return Err(HashError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                return Err(HashError::Failed("the hashing threads are gone".into()));
            }
        }
        rx.await
            .map_err(|_| HashError::Failed("a hashing thread stopped".into()))
    }

    /// One of the [`WORKERS`] slots, waiting at most [`MAX_WAIT`] behind at most
    /// [`MAX_WAITING`] others.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, HashError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(HashError::Busy);
        }
        // Counted out again however this ends, including the caller going away.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(MAX_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(HashError::Failed("the hashing slots are closed".into())),
            Err(_) => Err(HashError::Busy),
        }
    }
}

/// A worker: takes jobs until the sender is dropped. The slot comes with the job and is
/// released when the work is done, even if the caller stopped waiting for it.
fn work(rx: &Mutex<Receiver<(Job, OwnedSemaphorePermit)>>) {
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let next = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok((job, permit)) = next else { return };
        match job {
            Job::Hash { password, reply } => {
                let result = hash(&mut memory, password.as_bytes());
                drop(permit);
                let _ = reply.send(result);
            }
            Job::Verify {
                password,
                hash,
                reply,
            } => {
                let result = match hash {
                    Some(h) => verify(&mut memory, password.as_bytes(), &h),
                    None => unknown(&mut memory, password.as_bytes()),
                };
                drop(permit);
                let _ = reply.send(result);
            }
        }
    }
}

fn failed(e: impl std::fmt::Display) -> HashError {
    HashError::Failed(e.to_string())
}

/// Runs argon2 into `out` with the worker's buffer, grown to the cost's size if needed.
fn compute(
    memory: &mut Vec<Block>,
    argon2: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), HashError> {
    let blocks = argon2.params().block_count();
    if blocks > MAX_BLOCKS {
        return Err(failed(format!("a cost of {blocks} KiB is above the limit")));
    }
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let buffer = memory.get_mut(..blocks).ok_or_else(|| failed("buffer"))?;
    argon2
        .hash_password_into_with_memory(password, salt, out, buffer)
        .map_err(failed)
}

fn hash(memory: &mut Vec<Block>, password: &[u8]) -> Result<String, HashError> {
    let params = Params::DEFAULT;
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut salt = [0u8; Salt::RECOMMENDED_LENGTH];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    compute(memory, &argon2, password, &salt, &mut out)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(failed)?,
        salt: Some(Salt::new(&salt).map_err(failed)?),
        hash: Some(Output::new(&out).map_err(failed)?),
    };
    Ok(phc.to_string())
}

fn verify(memory: &mut Vec<Block>, password: &[u8], stored: &str) -> Result<bool, HashError> {
    let phc = PasswordHash::new(stored).map_err(failed)?;
    let algorithm = Algorithm::try_from(phc.algorithm.as_str()).map_err(failed)?;
    let version = match phc.version {
        Some(v) => Version::try_from(v).map_err(failed)?,
        None => Version::default(),
    };
    let params = Params::try_from(&phc).map_err(failed)?;
    let (Some(salt), Some(expected)) = (&phc.salt, &phc.hash) else {
        return Err(failed("the stored hash has no salt or output"));
    };
    let argon2 = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.len()];
    compute(memory, &argon2, password, salt, &mut out)?;
    // `Output`'s equality is constant-time.
    Ok(Output::new(&out).map_err(failed)? == *expected)
}

/// The work of a verification against the default cost, for a name that has no hash.
fn unknown(memory: &mut Vec<Block>, password: &[u8]) -> Result<bool, HashError> {
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::DEFAULT);
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    compute(
        memory,
        &argon2,
        password,
        b"morrigan-no-such-identity",
        &mut out,
    )?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_match_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let p = Passwords::start().expect("workers");
        let h = p.hash("correct horse").await.expect("hash");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(p.verify("correct horse", Some(&h)).await.expect("verify"));
        assert!(!p.verify("wrong horse", Some(&h)).await.expect("verify"));
        assert!(!p.verify("correct horse", None).await.expect("unknown"));
        assert!(p.verify("x", Some("not a hash")).await.is_err());
        // Interchangeable with the crate's own PHC strings, both ways.
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", h.as_str())
                .is_ok()
        );
        let theirs = Argon2::default()
            .hash_password(b"battery staple")
            .expect("hash")
            .to_string();
        assert!(
            p.verify("battery staple", Some(&theirs))
                .await
                .expect("verify")
        );
    }
}
