//! Results: task states and results by id, kept in a store (Redis behind `results-redis`,
//! PostgreSQL behind `results-postgres`). Owns the [`TaskStatus`] / [`TaskState`] vocabulary, the
//! record a store keeps per task id (its status, the task's name and signature fingerprint, and
//! the reply exactly as a caller would have received it, in the task's codec), the worker's
//! background writer (batched, bounded retries, never in a task's way), and reading and waiting
//! for clients. The worker decides what to write; callers decode through their stub's types.

// Without a store compiled in, only the vocabulary and the connect error are used.
#![cfg_attr(
    not(any(feature = "results-redis", feature = "results-postgres")),
    allow(dead_code)
)]

#[cfg(feature = "results-postgres")]
mod postgres;
#[cfg(feature = "results-redis")]
mod redis;

use crate::error::Error;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long results are kept by default (`--result-ttl`).
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Writes waiting for the store at most; beyond, new writes are dropped and logged (the store is
/// down or too slow: tasks go on regardless).
const QUEUED_WRITES_MAX: usize = 100_000;
/// Writes sent to the store in one batch at most.
const BATCH_MAX: usize = 512;
/// Attempts of one batch before it is given up (and logged).
const WRITE_ATTEMPTS: u32 = 4;

/// Where a task is, as its worker last wrote it: `client.status(&id)`.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskStatus {
    /// The state.
    pub state: TaskState,
    /// The attempt it is at (1 for the first run).
    pub attempt: u32,
    /// The last fraction reported with `ctx.progress` during this attempt, if any.
    pub progress: Option<f32>,
    /// The message reported with it.
    pub message: Option<String>,
    /// When the worker wrote this.
    pub updated_at: SystemTime,
}

/// The state of a task in the result store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TaskState {
    /// A worker is running it.
    Started,
    /// An attempt failed; another one is scheduled.
    Retrying,
    /// It returned its value (final).
    Succeeded,
    /// It ran and its last attempt failed: an error, a panic, its time limit (final).
    Failed,
    /// It was refused without running: bad payload, unknown task, signature, expired, too many
    /// redeliveries (final).
    DeadLettered,
    /// It was revoked (final).
    Revoked,
}

impl TaskState {
    /// The name in the store.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskState::Started => "started",
            TaskState::Retrying => "retrying",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::DeadLettered => "dead_lettered",
            TaskState::Revoked => "revoked",
        }
    }

    /// The state of a name in the store.
    pub fn parse(name: &str) -> Option<TaskState> {
        [
            TaskState::Started,
            TaskState::Retrying,
            TaskState::Succeeded,
            TaskState::Failed,
            TaskState::DeadLettered,
            TaskState::Revoked,
        ]
        .into_iter()
        .find(|state| state.as_str() == name)
    }

    /// Whether nothing follows it: the task has a result (or never will).
    pub const fn is_final(self) -> bool {
        !matches!(self, TaskState::Started | TaskState::Retrying)
    }
}

/// A reply as a caller would have received it: its `type` (`result` or `error`), codec, body.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredReply {
    pub(crate) kind: String,
    pub(crate) content_type: String,
    pub(crate) body: Vec<u8>,
}

/// What a store keeps of a task id.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) status: TaskStatus,
    /// The task's name ("" when the worker did not know it: an unknown task).
    pub(crate) task: String,
    /// Its signature fingerprint, when known.
    pub(crate) signature: Option<String>,
    /// Its reply, in a final state.
    pub(crate) reply: Option<StoredReply>,
}

/// One write of the worker's.
#[derive(Clone, Debug)]
pub(crate) enum Write {
    /// A new state (clears the progress of an earlier attempt).
    State {
        id: String,
        task: String,
        signature: Option<String>,
        state: TaskState,
        attempt: u32,
        message: Option<String>,
        reply: Option<StoredReply>,
        at: SystemTime,
    },
    /// Progress of the running attempt.
    Progress {
        id: String,
        fraction: f32,
        message: String,
        at: SystemTime,
    },
}

impl Write {
    pub(crate) fn id(&self) -> &str {
        match self {
            Write::State { id, .. } | Write::Progress { id, .. } => id,
        }
    }
}

/// A connected store.
enum Store {
    #[cfg(feature = "results-redis")]
    Redis(redis::RedisStore),
    #[cfg(feature = "results-postgres")]
    Postgres(postgres::PgStore),
}

impl Store {
    #[allow(unused_variables)]
    async fn write(&self, batch: &[Write], ttl: Duration) -> Result<(), String> {
        match *self {
            #[cfg(feature = "results-redis")]
            Store::Redis(ref store) => store.write(batch, ttl).await,
            #[cfg(feature = "results-postgres")]
            Store::Postgres(ref store) => store.write(batch, ttl).await,
        }
    }

    #[allow(unused_variables)]
    async fn read(&self, id: &str) -> Result<Option<Record>, String> {
        match *self {
            #[cfg(feature = "results-redis")]
            Store::Redis(ref store) => store.read(id).await,
            #[cfg(feature = "results-postgres")]
            Store::Postgres(ref store) => store.read(id).await,
        }
    }

    /// A subscription to the completion of `id`, made before reading it (so that a completion
    /// between the read and the wait is not missed).
    #[allow(unused_variables)]
    async fn subscribe(&self, id: &str) -> Result<Completion, String> {
        match *self {
            #[cfg(feature = "results-redis")]
            Store::Redis(ref store) => store.subscribe(id).await,
            #[cfg(feature = "results-postgres")]
            Store::Postgres(ref store) => store.subscribe(id).await,
        }
    }
}

/// Told (maybe spuriously) when a task may have reached a final state.
pub(crate) struct Completion {
    signals: mpsc::Receiver<()>,
    /// Whatever keeps the subscription alive (a connection's driver).
    _guard: Box<dyn Send + Sync>,
}

impl Completion {
    pub(crate) fn new(signals: mpsc::Receiver<()>, guard: Box<dyn Send + Sync>) -> Completion {
        Completion {
            signals,
            _guard: guard,
        }
    }
}

/// A client's result store: where workers write states and results, and callers read them.
/// Cheap to clone.
#[derive(Clone)]
pub(crate) struct Results {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    writes: mpsc::Sender<Write>,
    url: String,
}

impl Results {
    /// Connects to the store at `url` (`redis://…`, `postgres://…`), with the records of
    /// `namespace` only; `ttl` is how long the records written through it are kept.
    pub(crate) async fn connect(
        url: &str,
        namespace: Option<&str>,
        ttl: Duration,
    ) -> Result<Results, Error> {
        let shown = redact(url);
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        let store = match scheme {
            "redis" | "rediss" => connect_redis(url, namespace).await,
            "postgres" | "postgresql" => connect_postgres(url, namespace).await,
            _ => Err(format!(
                "unsupported result store URL `{shown}`: expected redis:// or postgres://"
            )),
        }
        .map_err(|e| Error::Config(format!("result store {shown}: {e}")))?;
        let store = Arc::new(store);
        let (writes, queued) = mpsc::channel(QUEUED_WRITES_MAX);
        tokio::spawn(write_loop(store.clone(), queued, ttl));
        Ok(Results {
            inner: Arc::new(Inner {
                store,
                writes,
                url: shown,
            }),
        })
    }

    /// The store's URL, password redacted.
    pub(crate) fn url(&self) -> &str {
        &self.inner.url
    }

    /// Queues a write; never waits (a full queue drops it, with a log line).
    pub(crate) fn write(&self, write: Write) {
        if let Err(error) = self.inner.writes.try_send(write) {
            tracing::warn!(store = %self.inner.url, id = error.into_inner().id(), "the result store is behind: a state write was dropped");
        }
    }

    /// The record of `id`, if the store has one.
    pub(crate) async fn read(&self, id: &str) -> Result<Option<Record>, Error> {
        self.inner
            .store
            .read(id)
            .await
            .map_err(|e| Error::Config(format!("result store {}: {e}", self.inner.url)))
    }

    /// The record of `id` once final, or the last one seen when `deadline` passes first (`None`
    /// if none). Told by the store's notifications, with a bounded poll as a fallback.
    pub(crate) async fn wait(&self, id: &str, deadline: Instant) -> Result<Option<Record>, Error> {
        let store_error =
            |e: String| Error::Config(format!("result store {}: {e}", self.inner.url));
        let mut completion = self.inner.store.subscribe(id).await.map_err(store_error)?;
        let mut fallback = Duration::from_millis(250);
        loop {
            let record = self.inner.store.read(id).await.map_err(store_error)?;
            if record.as_ref().is_some_and(|r| r.status.state.is_final()) {
                return Ok(record);
            }
            let wake = (Instant::now() + fallback).min(deadline);
            tokio::select! {
                signal = completion.signals.recv() => {
                    if signal.is_none() {
                        // The subscription ended (its connection was lost): poll from now on.
                        let _ = tokio::time::timeout_at(wake, std::future::pending::<()>()).await;
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= deadline {
                return self.inner.store.read(id).await.map_err(store_error);
            }
            fallback = (fallback * 2).min(Duration::from_secs(5));
        }
    }
}

/// The worker's writer: batches what is queued, writes each batch with bounded retries, then
/// gives it up with a log line.
async fn write_loop(store: Arc<Store>, mut queued: mpsc::Receiver<Write>, ttl: Duration) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while queued.recv_many(&mut batch, BATCH_MAX).await > 0 {
        let mut attempt = 1;
        loop {
            match store.write(&batch, ttl).await {
                Ok(()) => break,
                Err(error) if attempt >= WRITE_ATTEMPTS => {
                    tracing::error!(%error, writes = batch.len(), "could not write task states to the result store; given up");
                    break;
                }
                Err(error) => {
                    tracing::debug!(%error, attempt, "result store write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    attempt += 1;
                }
            }
        }
        batch.clear();
    }
}

#[cfg(feature = "results-redis")]
async fn connect_redis(url: &str, namespace: Option<&str>) -> Result<Store, String> {
    redis::RedisStore::connect(url, namespace)
        .await
        .map(Store::Redis)
}

#[cfg(not(feature = "results-redis"))]
async fn connect_redis(_url: &str, _namespace: Option<&str>) -> Result<Store, String> {
    Err("Redis result stores need amqp-tasks' `results-redis` feature".to_owned())
}

#[cfg(feature = "results-postgres")]
async fn connect_postgres(url: &str, namespace: Option<&str>) -> Result<Store, String> {
    postgres::PgStore::connect(url, namespace)
        .await
        .map(Store::Postgres)
}

#[cfg(not(feature = "results-postgres"))]
async fn connect_postgres(_url: &str, _namespace: Option<&str>) -> Result<Store, String> {
    Err("PostgreSQL result stores need amqp-tasks' `results-postgres` feature".to_owned())
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() + 3 => {
            let userinfo = &rest[..at - scheme.len() - 3];
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{scheme}://{user}:***@{}", &url[at + 1..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Unix milliseconds of a time (0 before the epoch).
fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time of Unix milliseconds.
fn from_unix_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_their_names() {
        for state in [
            TaskState::Started,
            TaskState::Retrying,
            TaskState::Succeeded,
            TaskState::Failed,
            TaskState::DeadLettered,
            TaskState::Revoked,
        ] {
            assert_eq!(TaskState::parse(state.as_str()), Some(state));
        }
        assert_eq!(TaskState::parse("done"), None);
        assert!(!TaskState::Retrying.is_final());
        assert!(TaskState::DeadLettered.is_final());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://postgres:secret@127.0.0.1/test"),
            "postgres://postgres:***@127.0.0.1/test"
        );
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
    }

    #[tokio::test]
    async fn a_store_not_compiled_in_or_unknown_is_a_clear_error() {
        let error = Results::connect("memcached://x", None, DEFAULT_RESULT_TTL)
            .await
            .err()
            .expect("refused");
        assert!(
            error
                .to_string()
                .contains("expected redis:// or postgres://"),
            "{error}"
        );
        #[cfg(not(feature = "results-redis"))]
        {
            let error = Results::connect("redis://127.0.0.1:6379", None, DEFAULT_RESULT_TTL)
                .await
                .err()
                .expect("refused");
            assert!(
                error.to_string().contains("`results-redis` feature"),
                "{error}"
            );
        }
    }
}
