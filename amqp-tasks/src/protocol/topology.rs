//! Topology: queue names and arguments. Frozen: a queue's arguments must match on every declare,
//! so changing them would break every deployed worker. This module says what exists and how it is
//! named; declaring it is the transport's (`transport::topology`).
//!
//! - A task queue is named after the task (or its `queue = "..."` group), prefixed with
//!   `<namespace>.` when a namespace is configured; durable; its only argument is `x-queue-type`.
//! - Its dead letters go to `<queue>.dlq`, durable, same type.
//! - Its redelivered lane is `<queue>.redelivered`, durable, same type (see
//!   [`redelivered_queue`]).
//! - Each worker also consumes one presence queue per task it serves,
//!   `<namespace>.amqp-tasks.serves.<task>`: classic, not durable, auto-delete, empty (see
//!   [`presence_queue`]).
//! - Only workers (and the provisioning command) declare them; clients never do.
//!
//! # The scheduler's election queue
//!
//! Workers started with `--beat` elect the one active scheduler of periodic tasks through one
//! queue, `<namespace>.amqp-tasks.beat` (see [`beat_queue`]): durable, with exactly two
//! arguments, `x-queue-type` = `quorum` and `x-single-active-consumer` = `true`, whatever
//! `--queue-type` says. It holds the scheduler's token (a JSON message carrying the last tick
//! fired of each periodic task); the candidate that holds the token's delivery is the active
//! scheduler. Frozen like every other queue: these arguments never change.
//!
//! # Delays
//!
//! Delayed tasks (`.countdown()`, `.eta()`) and retries wait in the broker, not in a worker's
//! memory: in one of a cascade of fixed-delay queues, `<namespace>.amqp-tasks.delay.<ms>ms` for
//! 100 ms × 2ⁿ (n = 0..=20, 100 ms to 29 h), each with `x-message-ttl` = its delay and
//! `x-dead-letter-exchange` = `""`. A delayed message is published to the headers exchange
//! `<namespace>.amqp-tasks.delay` with routing key = its task queue and header `delay_bucket` =
//! the largest delay not longer than what remains; when it expires, the broker dead-letters it to
//! its task queue (the routing key is kept). With `--queue-type quorum` the delay set is made of
//! quorum queues of names of their own: the exchange `<namespace>.amqp-tasks.delay-quorum` and
//! the buckets `<namespace>.amqp-tasks.delay-quorum.<ms>ms`, with `x-dead-letter-strategy` =
//! `at-least-once` and `x-overflow` = `reject-publish`; a sender uses that set when its exchange
//! exists, the classic one otherwise. A worker that receives a task whose `eta` is still
//! 100 ms or more away sends it on to the next bucket. So any delay works, hop by hop (each hop
//! at least halves what remains), with a resolution of 100 ms (a task may start up to 100 ms
//! early, never late by the cascade). Fixed-delay queues expire in order: no message waits behind
//! a longer one.

use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

/// Delays shorter than this are not held: the task runs now.
pub const DELAY_RESOLUTION: Duration = Duration::from_millis(100);

/// The delay of each bucket queue, in milliseconds: 100 ms × 2ⁿ.
pub const DELAY_BUCKETS_MS: [u64; 21] = {
    let mut buckets = [0; 21];
    let mut n = 0;
    while n < 21 {
        buckets[n] = 100 << n;
        n += 1;
    }
    buckets
};

/// The header that routes a delayed message to its bucket.
pub(crate) const DELAY_BUCKET_HEADER: &str = "delay_bucket";

/// The bucket for a delay: the longest not longer than `remaining_ms`; `None` below the resolution.
pub(crate) fn delay_bucket(remaining_ms: u64) -> Option<u64> {
    DELAY_BUCKETS_MS
        .iter()
        .rev()
        .copied()
        .find(|bucket| *bucket <= remaining_ms)
}

/// The headers exchange delayed messages are published to (the classic delay set).
pub fn delay_exchange(namespace: Option<&str>) -> String {
    delay_exchange_of(namespace, QueueType::Classic)
}

/// The bucket queue of a delay (the classic delay set).
pub fn delay_queue(namespace: Option<&str>, bucket_ms: u64) -> String {
    delay_queue_of(namespace, bucket_ms, QueueType::Classic)
}

/// The delay set's stem: classic deployments keep the original names; the quorum set has names of
/// its own, since a deployed queue's arguments can never change.
fn delay_stem(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Classic => "amqp-tasks.delay",
        QueueType::Quorum => "amqp-tasks.delay-quorum",
    }
}

/// The headers exchange of a delay set.
pub fn delay_exchange_of(namespace: Option<&str>, queue_type: QueueType) -> String {
    queue_name(namespace, delay_stem(queue_type))
}

/// A bucket queue of a delay set.
pub fn delay_queue_of(namespace: Option<&str>, bucket_ms: u64, queue_type: QueueType) -> String {
    queue_name(
        namespace,
        &format!("{}.{bucket_ms}ms", delay_stem(queue_type)),
    )
}

/// The RabbitMQ queue type of task and dead-letter queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueType {
    /// A classic queue (the default): one node, fastest.
    #[default]
    Classic,
    /// A quorum queue: replicated across a cluster (per-consumer prefetch only).
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` argument.
    pub const fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!(
                "unknown queue type `{other}`: expected `classic` or `quorum`"
            )),
        }
    }
}

/// The arguments of the bucket queue of a delay: its TTL, and the default exchange to
/// dead-letter expired messages to (keeping their routing key, the task queue). A quorum bucket
/// dead-letters `at-least-once` (which RabbitMQ allows only with `x-overflow = reject-publish`),
/// so that a delayed task is not lost on its way back, whatever node fails.
pub(crate) fn delay_queue_arguments(bucket_ms: u64, queue_type: QueueType) -> FieldTable {
    let mut arguments = task_queue_arguments(queue_type);
    if queue_type == QueueType::Quorum {
        arguments.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(bucket_ms).unwrap_or(i64::MAX)),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments
}

/// The headers-exchange binding of a bucket queue.
pub(crate) fn delay_binding(bucket_ms: u64) -> FieldTable {
    let mut binding = FieldTable::default();
    binding.insert("x-match".into(), AMQPValue::LongString("all".into()));
    binding.insert(
        DELAY_BUCKET_HEADER.into(),
        AMQPValue::LongString(bucket_ms.to_string().into()),
    );
    binding
}

/// `queue`, or `<namespace>.queue`.
pub fn queue_name(namespace: Option<&str>, queue: &str) -> String {
    // On every send: a plain concatenation, not `format!`.
    match namespace {
        Some(namespace) => [namespace, ".", queue].concat(),
        None => queue.to_owned(),
    }
}

/// The redelivered lane of a task queue, `<queue>.redelivered`: messages the broker redelivered
/// (their worker died or lost its connection while holding them) wait here, and are run one at a
/// time, each alone in its worker, so that a message that kills its worker is told apart from the
/// ones that happened to be prefetched with it. Durable, same type as its task queue.
pub fn redelivered_queue(queue: &str) -> String {
    format!("{queue}.redelivered")
}

/// The presence queue of a task, `<namespace>.amqp-tasks.serves.<task>`: every live worker that
/// serves the task consumes it (auto-delete, never holding a message), so that a worker given a
/// task it does not serve can tell whether another one does.
pub fn presence_queue(namespace: Option<&str>, task: &str) -> String {
    queue_name(namespace, &format!("amqp-tasks.serves.{task}"))
}

/// The scheduler's election queue, `<namespace>.amqp-tasks.beat` (see the [module
/// documentation](self#the-schedulers-election-queue)).
pub fn beat_queue(namespace: Option<&str>) -> String {
    queue_name(namespace, "amqp-tasks.beat")
}

/// The arguments of the election queue: quorum, single active consumer. Frozen.
pub(crate) fn beat_queue_arguments() -> FieldTable {
    let mut arguments = task_queue_arguments(QueueType::Quorum);
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments
}

/// The events exchange, `<namespace>.amqp-tasks.events`: a durable topic exchange to which
/// workers started with `--events` publish task events (routing key `task.<event>.<task name>`)
/// and worker events (`worker.<event>`), transient, as JSON.
pub fn events_exchange(namespace: Option<&str>) -> String {
    queue_name(namespace, "amqp-tasks.events")
}

/// The control exchange, `<namespace>.amqp-tasks.control`: a durable fanout exchange to which
/// `amqp-tasks inspect` sends its requests; every live worker has a queue of its own bound to it.
pub fn control_exchange(namespace: Option<&str>) -> String {
    queue_name(namespace, "amqp-tasks.control")
}

/// The revocations stream, `<namespace>.amqp-tasks.revoked`: `amqp-tasks revoke` appends to it,
/// every worker reads it from its first message before it takes tasks (and then follows it).
/// A stream queue (durable), always declared with the same arguments: `x-queue-type` `stream`,
/// `x-max-age` [`REVOCATION_RETENTION`], `x-stream-max-segment-size-bytes` 1,000,000.
pub fn revocations_queue(namespace: Option<&str>) -> String {
    queue_name(namespace, "amqp-tasks.revoked")
}

/// How long revocations are kept (`x-max-age`).
pub const REVOCATION_RETENTION: &str = "24h";

/// The revocations stream's arguments, the same for every declare: a stream kept 24 h, in small
/// segments (the broker drops whole segments only).
pub(crate) fn revocations_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    arguments.insert(
        "x-max-age".into(),
        AMQPValue::LongString(REVOCATION_RETENTION.into()),
    );
    arguments.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(1_000_000),
    );
    arguments
}

/// The dead-letter queue of a task queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("cannot be empty".into())
    } else if name.len() > 200 {
        Err("must be at most 200 bytes".into())
    } else if name.starts_with("amq.") {
        Err("cannot start with `amq.` (reserved by RabbitMQ)".into())
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("cannot contain whitespace".into())
    } else {
        Ok(())
    }
}

/// The arguments of a task queue and of its dead-letter queue: only `x-queue-type`.
pub(crate) fn task_queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    arguments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_election_queue_is_quorum_with_one_active_consumer() {
        let arguments = beat_queue_arguments();
        let inner = arguments.inner();
        assert_eq!(inner.len(), 2);
        assert_eq!(
            inner.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            inner.get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
    }

    #[test]
    fn buckets_cover_100ms_to_29h() {
        assert_eq!(DELAY_BUCKETS_MS[0], 100);
        assert_eq!(DELAY_BUCKETS_MS[20], 104_857_600);
        assert_eq!(delay_bucket(99), None);
        assert_eq!(delay_bucket(100), Some(100));
        assert_eq!(delay_bucket(399), Some(200));
        assert_eq!(delay_bucket(400), Some(400));
        assert_eq!(delay_bucket(u64::MAX), Some(104_857_600));
    }

    #[test]
    fn names_follow_the_namespace() {
        assert_eq!(queue_name(Some("staging"), "add"), "staging.add");
        assert_eq!(redelivered_queue("staging.add"), "staging.add.redelivered");
        assert_eq!(
            presence_queue(Some("staging"), "math.div"),
            "staging.amqp-tasks.serves.math.div"
        );
        assert_eq!(dead_letter_queue("staging.add"), "staging.add.dlq");
        assert_eq!(beat_queue(Some("staging")), "staging.amqp-tasks.beat");
        assert_eq!(beat_queue(None), "amqp-tasks.beat");
        assert_eq!(delay_exchange(None), "amqp-tasks.delay");
        assert_eq!(delay_queue(Some("t"), 800), "t.amqp-tasks.delay.800ms");
        assert_eq!(
            delay_queue_of(Some("t"), 800, QueueType::Quorum),
            "t.amqp-tasks.delay-quorum.800ms"
        );
        assert_eq!(
            delay_exchange_of(None, QueueType::Quorum),
            "amqp-tasks.delay-quorum"
        );
    }
}
