//! Topology: queue names and declarations. Frozen: a queue's arguments must match on every
//! declare, so changing them would break every deployed worker.
//!
//! - A task queue is named after the task (or its `queue = "..."` group), prefixed with
//!   `<namespace>.` when a namespace is configured; durable; its only argument is `x-queue-type`.
//! - Its dead letters go to `<queue>.dlq`, durable, same type.
//! - Only workers (and the provisioning command) declare them; clients never do.

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

/// The RabbitMQ queue type of task and dead-letter queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
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

/// `queue`, or `<namespace>.queue`.
pub(crate) fn queue_name(namespace: Option<&str>, queue: &str) -> String {
    match namespace {
        Some(namespace) => format!("{namespace}.{queue}"),
        None => queue.to_owned(),
    }
}

/// The dead-letter queue of a task queue.
pub(crate) fn dead_letter_queue(queue: &str) -> String {
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

fn arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    arguments
}

/// Declares a task queue and its dead-letter queue.
pub(crate) async fn declare_task_queue(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> Result<(), lapin::Error> {
    for name in [queue.to_owned(), dead_letter_queue(queue)] {
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments(queue_type),
            )
            .await?;
    }
    Ok(())
}
