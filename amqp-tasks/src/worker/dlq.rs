//! Dead-letter tools: list the messages in a task queue's `.dlq` with their reasons, and replay
//! them into the task queue once the cause is fixed (`worker dlq list|replay <task>`). The format
//! of a dead letter is `protocol::dead_letter`'s; this is the I/O.

pub use crate::protocol::dead_letter::DeadLetter;

use crate::client::Client;
use crate::error::{BrokerError, CallError, Error};
use crate::protocol::dead_letter::{describe, fresh};
use crate::protocol::topology;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use tokio::time::Instant;

/// Lists up to `limit` dead letters of the task queue `queue` (namespaced) without removing them.
pub async fn list(client: &Client, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, Error> {
    let dlq = topology::dead_letter_queue(queue);
    let channel = channel(client).await?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(message) = get(&channel, &dlq).await? else {
            break;
        };
        letters.push(describe(
            &message.delivery.properties,
            &message.delivery.data,
        ));
    }
    // Unacked: closing the channel puts them back where they were.
    let _ = channel.close(200, "listed".into()).await;
    Ok(letters)
}

/// Moves dead letters back into their task queue (all of them, those of task id `only`, at most
/// `limit`), each with its task id, its attempt count reset, and without `reply_to`,
/// `expiration` or deadline: nobody waits for a replay. Returns how many were replayed.
pub async fn replay(
    client: &Client,
    queue: &str,
    only: Option<&str>,
    limit: Option<usize>,
) -> Result<usize, Error> {
    let dlq = topology::dead_letter_queue(queue);
    let channel = channel(client).await?;
    let mut replayed = 0;
    while limit.is_none_or(|limit| replayed < limit) {
        let Some(message) = get(&channel, &dlq).await? else {
            break;
        };
        let delivery = &message.delivery;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        if only.is_some_and(|only| id.as_deref() != Some(only)) {
            continue; // left unacked: back in the dead-letter queue when the channel closes
        }
        let (target, properties) = fresh(queue, &delivery.properties);
        let deadline = Instant::now() + client.confirm_timeout();
        client
            .publish(&target, &delivery.data, properties, None, deadline)
            .await
            .map_err(|e| replay_failed(&target, e))?;
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(|source| Error::Broker {
                action: format!("acking a replayed message of `{dlq}`"),
                source: BrokerError::new(source),
            })?;
        replayed += 1;
    }
    let _ = channel.close(200, "replayed".into()).await;
    Ok(replayed)
}

fn replay_failed(queue: &str, error: CallError) -> Error {
    Error::Config(format!("could not replay into `{queue}`: {error}"))
}

async fn channel(client: &Client) -> Result<lapin::Channel, Error> {
    let session = client
        .session()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    session
        .connection
        .create_channel()
        .await
        .map_err(|source| Error::Broker {
            action: "opening a channel".to_owned(),
            source: BrokerError::new(source),
        })
}

async fn get(channel: &lapin::Channel, dlq: &str) -> Result<Option<BasicGetMessage>, Error> {
    channel
        .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(|source| Error::Broker {
            action: format!("reading `{dlq}` (does the task have a worker that declared it?)"),
            source: BrokerError::new(source),
        })
}
