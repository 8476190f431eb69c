//! [`QueueStatus`]: what the broker says about a task queue and its dead letters, asked through
//! passive declares (plain AMQP, so no management plugin is needed). `amqp-tasks queues` prints it.

use super::Client;
use crate::error::{BrokerError, Error};
use crate::protocol::topology;
use crate::transport::probe::Entity;

/// A task queue as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStatus {
    /// The queue's name on the broker (with the namespace).
    pub queue: String,
    /// Messages ready for delivery (not counting those delivered and not yet acked).
    pub ready: u32,
    /// Consumers: the workers (or aio-pika processes) serving the queue.
    pub consumers: u32,
    /// Messages in its `<queue>.dlq`; `None` when there is no such queue (a queue that a worker
    /// of this crate did not declare: an aio-pika one, say).
    pub dead_letters: Option<u32>,
}

impl Client {
    /// The status of the task queue `queue` (before the namespace; a task's queue is named after
    /// the task unless it sets `queue = "..."`), or `None` when the broker has no such queue.
    ///
    /// Read-only: passive declares create nothing and change no queue's arguments, so this works
    /// on queues declared by anyone, aio-pika's included.
    pub async fn queue_status(&self, queue: &str) -> Result<Option<QueueStatus>, Error> {
        let queue = self.queue_name(queue);
        let Some((ready, consumers)) = self.passive_declare(&queue).await? else {
            return Ok(None);
        };
        let dead_letters = self
            .passive_declare(&topology::dead_letter_queue(&queue))
            .await?
            .map(|(ready, _)| ready);
        Ok(Some(QueueStatus {
            queue,
            ready,
            consumers,
            dead_letters,
        }))
    }

    /// (ready messages, consumers) of a queue, `None` if it does not exist.
    async fn passive_declare(&self, queue: &str) -> Result<Option<(u32, u32)>, Error> {
        let session = self.session().await.map_err(|error| Error::Connect {
            url: self.url_redacted(),
            source: BrokerError::new(lapin::Error::from(std::io::Error::other(error.to_string()))),
        })?;
        match session.probe(queue, Entity::Queue).await {
            Ok(found) => Ok(found.map(|counts| (counts.ready, counts.consumers))),
            Err(source) => Err(Error::Broker {
                action: format!("inspecting `{queue}`"),
                source: BrokerError::new(source),
            }),
        }
    }
}
