//! Declaring the topology: the delay exchange and its bucket queues, task queues and their
//! dead-letter queues, the scheduler's election queue, the events and control exchanges, the
//! revocations stream, with the names and arguments `protocol::topology` fixes. The one place
//! that declares; clients never call it (they publish with `mandatory` instead).

use crate::protocol::topology::{
    DELAY_BUCKETS_MS, QueueType, beat_queue_arguments, dead_letter_queue, delay_binding,
    delay_exchange_of, delay_queue_arguments, delay_queue_of, redelivered_queue,
    task_queue_arguments,
};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

/// Declares the delay exchange and its bucket queues (idempotent; workers do it at start-up).
pub(crate) async fn declare_delays(
    channel: &Channel,
    namespace: Option<&str>,
    queue_type: QueueType,
) -> Result<(), lapin::Error> {
    let exchange = delay_exchange_of(namespace, queue_type);
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Headers,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for bucket in DELAY_BUCKETS_MS {
        let queue = delay_queue_of(namespace, bucket, queue_type);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                delay_queue_arguments(bucket, queue_type),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                delay_binding(bucket),
            )
            .await?;
    }
    Ok(())
}

/// Declares a task queue, its dead-letter queue and its redelivered lane.
pub(crate) async fn declare_task_queue(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> Result<(), lapin::Error> {
    for name in [
        queue.to_owned(),
        dead_letter_queue(queue),
        redelivered_queue(queue),
    ] {
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                task_queue_arguments(queue_type),
            )
            .await?;
    }
    Ok(())
}

/// Declares a presence queue: classic, not durable, auto-delete (gone with its last consumer).
pub(crate) async fn declare_presence(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            task_queue_arguments(QueueType::Classic),
        )
        .await
        .map(drop)
}

/// Declares the scheduler's election queue (quorum, single active consumer); returns what the
/// broker says of it (how many tokens are ready).
pub(crate) async fn declare_beat_queue(
    channel: &Channel,
    queue: &str,
) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            beat_queue_arguments(),
        )
        .await
}

/// Declares the events exchange (a durable topic exchange; idempotent: workers with `--events`
/// and `amqp-tasks events` declare it alike).
pub(crate) async fn declare_events(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares a queue of this connection's own, `<prefix>.<random uuid>` (exclusive, auto-delete:
/// it goes with the connection), and returns its name: where `inspect` collects answers, a worker
/// hears control requests, and `amqp-tasks events` listens.
pub(crate) async fn declare_private_queue(
    channel: &Channel,
    prefix: &str,
) -> Result<String, lapin::Error> {
    let queue = format!(
        "{prefix}.{}",
        crate::protocol::trace::random_uuid().simple()
    );
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), options, FieldTable::default())
        .await?;
    Ok(queue)
}

/// Declares the control exchange (a durable fanout exchange; idempotent: workers and
/// `amqp-tasks inspect` declare it alike).
pub(crate) async fn declare_control(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares the revocations stream with its one set of arguments (workers and
/// `amqp-tasks revoke` alike).
pub(crate) async fn declare_revocations(
    channel: &Channel,
    queue: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            crate::protocol::topology::revocations_arguments(),
        )
        .await
        .map(|_| ())
}
