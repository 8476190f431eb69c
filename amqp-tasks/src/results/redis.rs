//! The Redis result store: one hash per task id (`<namespace>.amqp-tasks.result.<id>`), expired
//! by Redis itself (`PEXPIRE` on every write), written in one pipeline per batch through redis-rs'
//! connection manager; a final state is announced on `<namespace>.amqp-tasks.done.<id>`, which
//! waiters subscribe to (no keyspace notifications needed).

use super::{Completion, Record, StoredReply, TaskState, TaskStatus, Write, from_unix_ms, unix_ms};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long one command may take before the store counts as unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct RedisStore {
    client: redis::Client,
    connection: ConnectionManager,
    prefix: String,
}

impl RedisStore {
    pub(super) async fn connect(url: &str, namespace: Option<&str>) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = tokio::time::timeout(
            RESPONSE_TIMEOUT * 3,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
        Ok(RedisStore {
            client,
            connection,
            prefix: namespace.map_or_else(String::new, |ns| format!("{ns}.")),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}amqp-tasks.result.{id}", self.prefix)
    }

    fn channel(&self, id: &str) -> String {
        format!("{}amqp-tasks.done.{id}", self.prefix)
    }

    pub(super) async fn write(&self, batch: &[Write], ttl: Duration) -> Result<(), String> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let mut pipe = redis::pipe();
        for write in batch {
            let key = self.key(write.id());
            match write {
                Write::State {
                    id,
                    task,
                    signature,
                    state,
                    attempt,
                    message,
                    reply,
                    at,
                } => {
                    pipe.cmd("DEL").arg(&key).ignore();
                    let hset = pipe
                        .cmd("HSET")
                        .arg(&key)
                        .arg("task")
                        .arg(task)
                        .arg("state")
                        .arg(state.as_str())
                        .arg("attempt")
                        .arg(attempt)
                        .arg("at")
                        .arg(unix_ms(*at));
                    if let Some(signature) = signature {
                        hset.arg("sig").arg(signature);
                    }
                    if let Some(message) = message {
                        hset.arg("message").arg(message);
                    }
                    if let Some(reply) = reply {
                        hset.arg("kind")
                            .arg(&reply.kind)
                            .arg("ct")
                            .arg(&reply.content_type)
                            .arg("body")
                            .arg(&reply.body[..]);
                    }
                    hset.ignore();
                    pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
                    if state.is_final() {
                        pipe.cmd("PUBLISH")
                            .arg(self.channel(id))
                            .arg(state.as_str())
                            .ignore();
                    }
                }
                Write::Progress {
                    fraction,
                    message,
                    at,
                    ..
                } => {
                    pipe.cmd("HSET")
                        .arg(&key)
                        .arg("progress")
                        .arg(fraction.to_string())
                        .arg("message")
                        .arg(message)
                        .arg("at")
                        .arg(unix_ms(*at))
                        .ignore();
                    pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
                }
            }
        }
        let mut connection = self.connection.clone();
        pipe.exec_async(&mut connection)
            .await
            .map_err(|e| e.to_string())
    }

    pub(super) async fn read(&self, id: &str) -> Result<Option<Record>, String> {
        let mut connection = self.connection.clone();
        let mut fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.key(id))
            .query_async(&mut connection)
            .await
            .map_err(|e| e.to_string())?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut text = |name: &str| {
            fields
                .remove(name)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        // A hash with progress but no state yet: its Started write is behind or was lost.
        let state = text("state")
            .and_then(|s| TaskState::parse(&s))
            .unwrap_or(TaskState::Started);
        let status = TaskStatus {
            state,
            attempt: text("attempt").and_then(|a| a.parse().ok()).unwrap_or(1),
            progress: text("progress").and_then(|p| p.parse().ok()),
            message: text("message"),
            updated_at: from_unix_ms(text("at").and_then(|a| a.parse().ok()).unwrap_or(0)),
        };
        let task = text("task").unwrap_or_default();
        let signature = text("sig");
        let reply = match (text("kind"), text("ct")) {
            (Some(kind), Some(content_type)) => Some(StoredReply {
                kind,
                content_type,
                body: fields.remove("body").unwrap_or_default(),
            }),
            _ => None,
        };
        Ok(Some(Record {
            status,
            task,
            signature,
            reply,
        }))
    }

    pub(super) async fn subscribe(&self, id: &str) -> Result<Completion, String> {
        let mut pubsub = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        pubsub
            .subscribe(self.channel(id))
            .await
            .map_err(|e| e.to_string())?;
        let (signal, signals) = mpsc::channel(1);
        let listener = tokio::spawn(async move {
            let mut messages = std::pin::pin!(pubsub.into_on_message());
            while std::future::poll_fn(|cx| futures_core::Stream::poll_next(messages.as_mut(), cx))
                .await
                .is_some()
            {
                let _ = signal.try_send(());
            }
        });
        Ok(Completion::new(signals, Box::new(AbortOnDrop(listener))))
    }
}

/// Ends a subscription's listener with its waiter.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
