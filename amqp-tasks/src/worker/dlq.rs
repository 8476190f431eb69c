//! Dead-letter tools: list the messages in a task queue's `.dlq` with their reasons, and replay
//! them into the task queue once the cause is fixed (`worker dlq list|replay <task>`). The format
//! of a dead letter is `protocol::dead_letter`'s; this is the I/O.

pub use crate::protocol::dead_letter::DeadLetter;

use crate::client::Client;
use crate::error::{BrokerError, CallError, Error};
use crate::protocol::dead_letter::{describe, fresh};
use crate::protocol::headers::{HeaderBudget, fit};
use crate::protocol::topology;
use crate::transport::probe::Entity;
use crate::transport::publish::Message;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use std::time::Duration;
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
///
/// It looks at each message of the dead-letter queue at most once (as many as the queue held when
/// it started), and never holds more than a window of them: the ones that `only` leaves out go
/// back to the end of the dead-letter queue as they were.
pub async fn replay(
    client: &Client,
    queue: &str,
    only: Option<&str>,
    limit: Option<usize>,
) -> Result<usize, Error> {
    const WINDOW: usize = 256;
    let dlq = topology::dead_letter_queue(queue);
    let session = client
        .session()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let budget = HeaderBudget::for_frame_max(session.frame_max());
    let held = session
        .probe(&dlq, Entity::Queue)
        .await
        .map_err(|source| Error::Broker {
            action: format!("inspecting `{dlq}`"),
            source: BrokerError::new(source),
        })?
        .map_or(0, |counts| counts.ready as usize);
    let channel = channel(client).await?;
    let mut replayed = 0;
    let mut seen = 0;
    let mut kept: Vec<(u64, Message)> = Vec::new();
    while seen < held && limit.is_none_or(|limit| replayed < limit) {
        let Some(message) = get(&channel, &dlq).await? else {
            break;
        };
        seen += 1;
        let delivery = message.delivery;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        if only.is_some_and(|only| id.as_deref() != Some(only)) {
            // Not this one: back to the end of the dead-letter queue, a window at a time.
            let properties = delivery.properties.clone();
            kept.push((
                delivery.delivery_tag,
                Message {
                    queue: dlq.clone(),
                    body: delivery.data,
                    properties,
                    eta_ms: None,
                },
            ));
            if kept.len() >= WINDOW {
                put_back(client, &channel, &dlq, std::mem::take(&mut kept)).await?;
            }
            continue;
        }
        let (target, properties) = fresh(queue, &delivery.properties);
        let properties = match properties.headers() {
            Some(table) => {
                let table = fit(table.clone(), budget.write);
                properties.with_headers(table)
            }
            None => properties,
        };
        let deadline = Instant::now() + client.confirm_timeout();
        client
            .publish(&target, &delivery.data, properties, None, deadline)
            .await
            .map_err(|e| replay_failed(&target, e))?;
        ack(&channel, &dlq, delivery.delivery_tag).await?;
        replayed += 1;
    }
    put_back(client, &channel, &dlq, kept).await?;
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        channel.close(200, "replayed".into()),
    )
    .await;
    Ok(replayed)
}

/// Republishes messages a replay leaves in the dead-letter queue, then acks their originals.
async fn put_back(
    client: &Client,
    channel: &lapin::Channel,
    dlq: &str,
    kept: Vec<(u64, Message)>,
) -> Result<(), Error> {
    if kept.is_empty() {
        return Ok(());
    }
    let (tags, messages): (Vec<u64>, Vec<Message>) = kept.into_iter().unzip();
    let deadline = Instant::now() + client.confirm_timeout();
    for result in client.publish_batch(messages, deadline).await {
        result.map_err(|e| replay_failed(dlq, e))?;
    }
    for tag in tags {
        ack(channel, dlq, tag).await?;
    }
    Ok(())
}

async fn ack(channel: &lapin::Channel, dlq: &str, tag: u64) -> Result<(), Error> {
    channel
        .basic_ack(tag, BasicAckOptions::default())
        .await
        .map_err(|source| Error::Broker {
            action: format!("acking a message of `{dlq}`"),
            source: BrokerError::new(source),
        })
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
