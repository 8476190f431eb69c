//! Control (`amqp-tasks inspect ping|registered|active|stats`): every worker consumes a queue of
//! its own (exclusive, auto-delete) bound to the namespace's control exchange
//! `amqp-tasks.control` (fanout), and answers each request to its `reply_to` with what it is:
//! its id (`<host>:<pid>`) and uptime, its tasks, what runs now (task, id, for how long), its
//! outcome counters. It keeps the handlers running now ([`Control::enter`]) and the counters;
//! the listener reopens its channel when it is lost. A run can be terminated
//! ([`Control::terminate`], for `revoke --terminate`). Requests are authenticated by the broker
//! only (vhost permissions).

use crate::client::Client;
use crate::protocol::control::{Inspect, Request};
use crate::protocol::outcome::Outcome;
use crate::protocol::topology::control_exchange;
use crate::transport::next;
use lapin::options::{BasicPublishOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long opening the control channel, or answering, may take.
const PATIENCE: Duration = Duration::from_secs(5);

/// A handler running now.
struct Active {
    task: &'static str,
    id: String,
    since: Instant,
    /// Notified to cancel it (`revoke --terminate`).
    stop: Arc<Notify>,
}

/// What `inspect` is answered from.
pub(crate) struct Control {
    worker: String,
    started: Instant,
    tasks: Vec<&'static str>,
    concurrency: usize,
    next: AtomicU64,
    active: Mutex<HashMap<u64, Active>>,
    outcomes: [AtomicU64; 7],
    /// What this worker is to the periodic tasks' scheduler: a [`SchedulerRole`] as a number.
    scheduler: AtomicU8,
}

/// What a worker is to the scheduler of periodic tasks, as `inspect ping` and `stats` tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SchedulerRole {
    /// Not started with `--beat` (or serving no periodic task).
    None = 0,
    /// A `--beat` candidate waiting for the token.
    Candidate = 1,
    /// The active scheduler: it holds the token.
    Active = 2,
}

impl SchedulerRole {
    fn as_str(self) -> &'static str {
        match self {
            SchedulerRole::None => "none",
            SchedulerRole::Candidate => "candidate",
            SchedulerRole::Active => "active",
        }
    }

    fn from_u8(n: u8) -> SchedulerRole {
        match n {
            1 => SchedulerRole::Candidate,
            2 => SchedulerRole::Active,
            _ => SchedulerRole::None,
        }
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

fn index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Succeeded => 0,
        Outcome::Retried => 1,
        Outcome::Failed => 2,
        Outcome::Panicked => 3,
        Outcome::TimeLimit => 4,
        Outcome::Rejected => 5,
        Outcome::Revoked => 6,
    }
}

const ORDER: [Outcome; 7] = [
    Outcome::Succeeded,
    Outcome::Retried,
    Outcome::Failed,
    Outcome::Panicked,
    Outcome::TimeLimit,
    Outcome::Rejected,
    Outcome::Revoked,
];

impl Control {
    pub(crate) fn new(worker: String, mut tasks: Vec<&'static str>, concurrency: usize) -> Control {
        tasks.sort_unstable();
        Control {
            worker,
            started: Instant::now(),
            tasks,
            concurrency,
            next: AtomicU64::new(0),
            active: Mutex::new(HashMap::new()),
            outcomes: Default::default(),
            scheduler: AtomicU8::new(SchedulerRole::None as u8),
        }
    }

    /// The scheduler says what this worker now is to it.
    pub(crate) fn set_scheduler(&self, role: SchedulerRole) {
        self.scheduler.store(role as u8, Ordering::Relaxed);
    }

    fn scheduler(&self) -> &'static str {
        SchedulerRole::from_u8(self.scheduler.load(Ordering::Relaxed)).as_str()
    }

    /// A handler starts: kept as active until [`Control::leave`] with the key returned; the
    /// [`Notify`] returned is notified if it is terminated.
    pub(crate) fn enter(&self, task: &'static str, id: &str) -> (u64, Arc<Notify>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Notify::new());
        let active = Active {
            task,
            id: id.to_owned(),
            since: Instant::now(),
            stop: stop.clone(),
        };
        if let Ok(mut running) = self.active.lock() {
            running.insert(key, active);
        }
        (key, stop)
    }

    /// Cancels every run of task `id` here; returns how many there were.
    pub(crate) fn terminate(&self, id: &str) -> usize {
        let Ok(running) = self.active.lock() else {
            return 0;
        };
        let mut cancelled = 0;
        for active in running.values().filter(|a| a.id == id) {
            // A stored permit: the run sees it even if it is not waiting yet.
            active.stop.notify_one();
            cancelled += 1;
        }
        cancelled
    }

    pub(crate) fn leave(&self, key: u64) {
        if let Ok(mut running) = self.active.lock() {
            running.remove(&key);
        }
    }

    pub(crate) fn settled(&self, outcome: Outcome) {
        self.outcomes[index(outcome)].fetch_add(1, Ordering::Relaxed);
    }

    /// The answer to `inspect`.
    pub(crate) fn answer(&self, inspect: Inspect) -> serde_json::Value {
        let uptime_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut active: Vec<serde_json::Value> = match self.active.lock() {
            Ok(running) => running
                .values()
                .map(|a| {
                    let ms = u64::try_from(a.since.elapsed().as_millis()).unwrap_or(u64::MAX);
                    json!({"task": a.task, "id": a.id, "running_ms": ms})
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        active.sort_by_key(|a| std::cmp::Reverse(a["running_ms"].as_u64()));
        match inspect {
            Inspect::Ping => json!({
                "worker": self.worker,
                "pong": true,
                "uptime_ms": uptime_ms,
                "scheduler": self.scheduler(),
            }),
            Inspect::Registered => json!({"worker": self.worker, "tasks": self.tasks}),
            Inspect::Active => json!({"worker": self.worker, "active": active}),
            Inspect::Stats => {
                let outcomes: serde_json::Map<String, serde_json::Value> = ORDER
                    .iter()
                    .map(|o| {
                        let n = self.outcomes[index(*o)].load(Ordering::Relaxed);
                        (o.as_str().to_owned(), n.into())
                    })
                    .collect();
                json!({
                    "worker": self.worker,
                    "uptime_ms": uptime_ms,
                    "concurrency": self.concurrency,
                    "in_flight": active.len(),
                    "outcomes": outcomes,
                    "scheduler": self.scheduler(),
                })
            }
        }
    }
}

/// Answers control requests for as long as it runs (the worker aborts it when it stops),
/// reopening its channel when it is lost.
pub(crate) async fn listen(client: Client, control: std::sync::Arc<Control>) {
    let exchange = control_exchange(client.namespace());
    loop {
        match open(&client, &exchange).await {
            Some((channel, mut consumer)) => {
                tracing::debug!("answering inspect requests on {exchange}");
                while let Some(Ok(delivery)) = next(&mut consumer).await {
                    let Ok(request) = serde_json::from_slice::<Request>(&delivery.data) else {
                        tracing::debug!("an unreadable control request; ignored");
                        continue;
                    };
                    let Some(reply_to) = delivery.properties.reply_to().clone() else {
                        continue;
                    };
                    let body = control.answer(request.inspect).to_string();
                    let mut properties =
                        BasicProperties::default().with_content_type("application/json".into());
                    if let Some(correlation) = delivery.properties.correlation_id() {
                        properties = properties.with_correlation_id(correlation.clone());
                    }
                    let _ = tokio::time::timeout(
                        PATIENCE,
                        channel.basic_publish(
                            "".into(),
                            reply_to,
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            properties,
                        ),
                    )
                    .await;
                }
            }
            None => tracing::debug!("cannot listen for inspect requests now; trying again"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The control exchange declared and this worker's queue bound to it and consumed.
async fn open(client: &Client, exchange: &str) -> Option<(Channel, Consumer)> {
    let opened = tokio::time::timeout(PATIENCE, async {
        let session = client.session().await.ok()?;
        let channel = session.connection.create_channel().await.ok()?;
        crate::transport::topology::declare_control(&channel, exchange)
            .await
            .ok()?;
        let queue = crate::transport::topology::declare_private_queue(&channel, exchange)
            .await
            .ok()?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .ok()?;
        let consumer = crate::transport::consume_no_ack(&channel, &queue)
            .await
            .ok()?;
        Some((channel, consumer))
    })
    .await;
    opened.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokio_test_ready(stop: &Notify) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let notified = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), stop.notified()).await
        });
        assert!(notified.is_ok(), "a terminated run is told");
    }

    #[test]
    fn answers_say_what_runs_and_what_ended() {
        let control = Control::new("host:1".into(), vec!["add", "sleep_ms"], 8);
        let (key, stop) = control.enter("sleep_ms", "id-1");
        assert_eq!(control.terminate("id-2"), 0);
        assert_eq!(control.terminate("id-1"), 1);
        // The permit is kept until the run waits for it.
        tokio_test_ready(&stop);
        control.settled(Outcome::Succeeded);
        control.settled(Outcome::Succeeded);
        control.settled(Outcome::Failed);
        let active = control.answer(Inspect::Active);
        assert_eq!(active["active"][0]["task"], "sleep_ms");
        assert_eq!(active["active"][0]["id"], "id-1");
        let stats = control.answer(Inspect::Stats);
        assert_eq!(stats["outcomes"]["succeeded"], 2);
        assert_eq!(stats["outcomes"]["failed"], 1);
        assert_eq!(stats["in_flight"], 1);
        control.leave(key);
        assert_eq!(control.answer(Inspect::Active)["active"], json!([]));
        assert_eq!(
            control.answer(Inspect::Registered)["tasks"],
            json!(["add", "sleep_ms"])
        );
        assert_eq!(control.answer(Inspect::Ping)["pong"], true);
        assert_eq!(control.answer(Inspect::Ping)["scheduler"], "none");
        control.set_scheduler(SchedulerRole::Active);
        assert_eq!(control.answer(Inspect::Stats)["scheduler"], "active");
        control.set_scheduler(SchedulerRole::Candidate);
        assert_eq!(control.answer(Inspect::Ping)["scheduler"], "candidate");
    }
}
