//! Dead-letter tooling: list the messages in a task queue's `.dlq` with their reasons, and replay
//! them into the task queue once the cause is fixed (`worker dlq list|replay <task>`).

use crate::client::Client;
use crate::codec::Codec;
use crate::error::{CallError, Error};
use crate::send::unix_ms;
use crate::topology;
use crate::wire::{self, TaskHeaders, header, value_i64, value_string};
use lapin::BasicProperties;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use std::time::SystemTime;
use tokio::time::Instant;

/// A dead-lettered task, as listed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The task id (`message_id`).
    pub id: String,
    /// The task name.
    pub task: String,
    /// Why it was dead-lettered (an [`ErrorKind`](crate::wire::ErrorKind) name).
    pub reason: String,
    /// The error message.
    pub error: String,
    /// When, Unix milliseconds.
    pub dead_at: Option<u64>,
    /// The attempt that failed last.
    pub attempt: u32,
    /// The errors of the attempts before it.
    pub history: Vec<String>,
    /// The body's codec and size, and the body itself when it is JSON.
    pub body: String,
}

/// Lists up to `limit` dead letters of the task queue `queue` (namespaced) without removing them.
pub async fn list(client: &Client, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, Error> {
    let dlq = topology::dead_letter_queue(queue);
    let channel = channel(client).await?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(message) = get(&channel, &dlq).await? else {
            break;
        };
        letters.push(describe(&message));
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
                source,
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
            source,
        })
}

async fn get(channel: &lapin::Channel, dlq: &str) -> Result<Option<BasicGetMessage>, Error> {
    channel
        .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(|source| Error::Broker {
            action: format!("reading `{dlq}` (does the task have a worker that declared it?)"),
            source,
        })
}

/// The message as it goes back: same id, body and codec, a first attempt, nobody waiting.
fn fresh(queue: &str, original: &BasicProperties) -> (String, BasicProperties) {
    let table = original.headers().clone().unwrap_or_default();
    let target = table
        .inner()
        .get(header::DEAD_QUEUE)
        .and_then(value_string)
        .unwrap_or_else(|| queue.to_owned());
    let mut headers = TaskHeaders::from_table(Some(&table));
    headers.attempt = 1;
    headers.deadline_ms = None;
    headers.eta_ms = None;
    headers.errors.clear();
    headers.redeliveries = 0;
    let mut map = headers.write_into(table.clone()).inner().clone();
    for key in [
        header::DEAD_REASON,
        header::DEAD_ERROR,
        header::DEAD_QUEUE,
        header::DEAD_AT,
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        header::DELIVERY_COUNT,
    ] {
        map.remove(key);
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_type(wire::TYPE_CALL.into())
        .with_headers(FieldTable::from(map));
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    (target, properties)
}

fn describe(message: &BasicGetMessage) -> DeadLetter {
    let properties = &message.delivery.properties;
    let table = properties.headers().clone().unwrap_or_default();
    let text = |key: &str| {
        table
            .inner()
            .get(key)
            .and_then(value_string)
            .unwrap_or_default()
    };
    let headers = TaskHeaders::from_table(Some(&table));
    let data = &message.delivery.data;
    let codec = properties
        .content_type()
        .as_ref()
        .and_then(|c| Codec::from_content_type(c.as_str()));
    let body = match codec {
        Some(Codec::Json) => format!(
            "json {}",
            String::from_utf8_lossy(&data[..data.len().min(200)])
        ),
        Some(Codec::Bincode) => format!("bincode, {} bytes", data.len()),
        None => format!(
            "{} bytes of `{}`",
            data.len(),
            properties
                .content_type()
                .as_ref()
                .map_or("(no content type)", |c| c.as_str())
        ),
    };
    DeadLetter {
        id: properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        task: headers.task.as_deref().unwrap_or_default().to_owned(),
        reason: text(header::DEAD_REASON),
        error: text(header::DEAD_ERROR),
        dead_at: table
            .inner()
            .get(header::DEAD_AT)
            .and_then(value_i64)
            .and_then(|ms| u64::try_from(ms).ok()),
        attempt: headers.attempt,
        history: headers.errors,
        body,
    }
}

impl std::fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = self
            .dead_at
            .map(|at| {
                let ago = unix_ms(SystemTime::now()).saturating_sub(at) / 1000;
                format!(
                    " ({}h{:02}m{:02}s ago)",
                    ago / 3600,
                    ago / 60 % 60,
                    ago % 60
                )
            })
            .unwrap_or_default();
        writeln!(
            f,
            "{} task `{}` attempt {}: {}{age}",
            self.id, self.task, self.attempt, self.reason
        )?;
        writeln!(f, "    error: {}", self.error)?;
        for earlier in &self.history {
            writeln!(f, "    before: {earlier}")?;
        }
        write!(f, "    body: {}", self.body)
    }
}
