//! Events (`worker --events`, [`WorkerBuilder::events`](super::WorkerBuilder::events)): task
//! events (`received`, `started`, the outcome, `dead_lettered`) and worker events (`online`,
//! `heartbeat` every 10 s, `offline`) published as JSON to the namespaced topic exchange
//! `amqp-tasks.events`. Fire-and-forget: a task only puts its event in a bounded queue (dropped
//! when full, never awaited); one publisher task sends them, transient and without confirms, on
//! a channel of its own, and opens another one when that fails.

use crate::client::Client;
use crate::protocol::event::Event;
use crate::protocol::topology::events_exchange;
use crate::protocol::unix_ms;
use crate::transport::topology::declare_events;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Events waiting to be published; past this many, new ones are dropped.
const BACKLOG: usize = 8192;
/// How often a worker says it is alive.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long opening a channel, or publishing one event, may take.
const PATIENCE: Duration = Duration::from_secs(5);

/// An event, encoded, with its routing key.
struct Encoded {
    key: String,
    body: Vec<u8>,
}

/// The worker's event publisher.
pub(crate) struct Events {
    worker: String,
    sender: Mutex<Option<mpsc::Sender<Encoded>>>,
    dropped: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// This process as events name it: `<host>:<pid>`.
pub(crate) fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

impl Events {
    /// Starts the publisher (and the heartbeat) on `client`'s connection.
    pub(crate) fn start(client: &Client) -> std::sync::Arc<Events> {
        let (sender, receiver) = mpsc::channel(BACKLOG);
        let events = std::sync::Arc::new(Events {
            worker: worker_id(),
            sender: Mutex::new(Some(sender)),
            dropped: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let exchange = events_exchange(client.namespace());
        let publisher = tokio::spawn(publish(client.clone(), exchange, receiver));
        let beating = std::sync::Arc::downgrade(&events);
        let heartbeat = tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            every.tick().await;
            loop {
                every.tick().await;
                match beating.upgrade() {
                    Some(events) => events.worker_event("heartbeat"),
                    None => return,
                }
            }
        });
        if let Ok(mut tasks) = events.tasks.lock() {
            tasks.push(publisher);
            tasks.push(heartbeat);
        }
        events
    }

    /// A task event.
    pub(crate) fn task_event(
        &self,
        event: &str,
        task: &str,
        id: &str,
        attempt: u32,
        error: Option<&str>,
    ) {
        self.emit(&Event {
            event,
            task: Some(task),
            id: Some(id),
            attempt: Some(attempt),
            worker: &self.worker,
            at_ms: unix_ms(SystemTime::now()),
            error,
        });
    }

    /// A worker event.
    pub(crate) fn worker_event(&self, event: &str) {
        self.emit(&Event {
            event,
            task: None,
            id: None,
            attempt: None,
            worker: &self.worker,
            at_ms: unix_ms(SystemTime::now()),
            error: None,
        });
    }

    fn emit(&self, event: &Event<'_>) {
        let encoded = Encoded {
            key: event.routing_key(),
            body: event.to_json(),
        };
        let sender = self.sender.lock().ok().and_then(|s| s.clone());
        let sent = sender.is_some_and(|sender| sender.try_send(encoded).is_ok());
        if !sent
            && self
                .dropped
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(10_000)
        {
            tracing::warn!("events are published slower than they happen: some are dropped");
        }
    }

    /// Says `offline`, then waits (bounded) for what is queued to be published.
    pub(crate) async fn stop(&self) {
        self.worker_event("offline");
        // The publisher ends once the queue is empty and closed.
        drop(self.sender.lock().ok().and_then(|mut s| s.take()));
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        let mut tasks = tasks.into_iter();
        if let Some(publisher) = tasks.next() {
            let _ = tokio::time::timeout(PATIENCE, publisher).await;
        }
        for task in tasks {
            task.abort();
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

/// Publishes queued events until the queue closes.
async fn publish(client: Client, exchange: String, mut receiver: mpsc::Receiver<Encoded>) {
    let mut channel: Option<Channel> = None;
    let mut batch = Vec::new();
    while receiver.recv_many(&mut batch, 256).await > 0 {
        for Encoded { key, body } in batch.drain(..) {
            if !channel.as_ref().is_some_and(|c| c.status().connected()) {
                channel = open(&client, &exchange).await;
            }
            let Some(open) = &channel else {
                continue;
            };
            let published = tokio::time::timeout(
                PATIENCE,
                open.basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_content_type("application/json".into()),
                ),
            )
            .await;
            if !matches!(published, Ok(Ok(_))) {
                channel = None;
            }
        }
    }
    if let Some(channel) = channel {
        let _ = tokio::time::timeout(PATIENCE, channel.close(200, "worker stopping".into())).await;
    }
}

/// A channel of the client's session with the exchange declared, or `None` for now.
async fn open(client: &Client, exchange: &str) -> Option<Channel> {
    let opened = tokio::time::timeout(PATIENCE, async {
        let session = client.session().await.ok()?;
        let channel = session.connection.create_channel().await.ok()?;
        declare_events(&channel, exchange).await.ok()?;
        Some(channel)
    })
    .await;
    match opened {
        Ok(Some(channel)) => Some(channel),
        _ => {
            tracing::debug!("cannot publish events now; dropping until the broker is back");
            None
        }
    }
}
