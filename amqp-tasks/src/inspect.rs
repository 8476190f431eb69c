//! [`QueueStatus`]: what the broker says about a task queue and its dead letters, asked through
//! passive declares (plain AMQP, so no management plugin is needed). `amqp-tasks queues` prints it.

use crate::client::Client;
use crate::error::Error;
use crate::topology;
use crate::wire;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

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
            source: lapin::Error::from(std::io::Error::other(error.to_string())),
        })?;
        let broker = |action: &str, source| Error::Broker {
            action: format!("{action} `{queue}`"),
            source,
        };
        // A channel per declare: the broker closes the channel on which a passive declare fails.
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| broker("opening a channel to inspect", e))?;
        let declared = channel
            .queue_declare(
                wire::short(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(found) => {
                let _ = channel.close(200, "inspected".into()).await;
                Ok(Some((found.message_count(), found.consumer_count())))
            }
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(broker("inspecting", error)),
        }
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}
