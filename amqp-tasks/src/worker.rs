//! The worker: serves every task linked into the binary (or a chosen subset).
//!
//! Run it as a binary with [`main`], or embed it in a tokio application with
//! [`Worker::builder`]`(client)…`[`.serve(shutdown)`](WorkerBuilder::serve).
//!
//! - One channel and consumer per task queue, manual acks, a small per-consumer prefetch.
//! - `concurrency` bounds the tasks running at once in the whole process, across queues; a task
//!   awaiting `.call(&ctx)` lends its slot back meanwhile.
//! - A task is acked only after its handler finished and its reply was published on the same
//!   channel; a worker killed mid-task loses nothing.
//! - Bad input and failed handlers are answered (where `reply_to` is set) and dead-lettered.
//! - On shutdown: consumers are cancelled, prefetched tasks not started are requeued, tasks in
//!   flight finish within the grace period, every ack is sent, then `serve` returns.

pub(crate) mod acker;
pub(crate) mod cli;
pub mod dead_letters;
mod process;

pub use cli::main;

use crate::client::{Client, Session, next};
use crate::error::Error;
use crate::registry::{self, Registration};
use crate::topology::{self, QueueType};
use acker::{AckSender, Settle};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

/// Default of [`WorkerBuilder::concurrency`].
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default of [`WorkerBuilder::grace_period`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default of [`WorkerBuilder::max_body_size`].
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;
/// Default of [`WorkerBuilder::max_redeliveries`].
pub const DEFAULT_MAX_REDELIVERIES: u32 = 5;

/// A configured worker; see the [module documentation](self).
pub struct Worker {
    client: Client,
    tasks: Vec<&'static Registration>,
    settings: Settings,
}

#[derive(Clone, Debug)]
struct Settings {
    concurrency: usize,
    prefetch: u16,
    grace: Duration,
    queue_type: QueueType,
    max_body: usize,
    max_redeliveries: u32,
}

/// Configures a [`Worker`].
#[must_use]
pub struct WorkerBuilder {
    client: Client,
    filter: Option<Vec<String>>,
    concurrency: usize,
    prefetch: Option<u16>,
    grace: Duration,
    queue_type: QueueType,
    max_body: usize,
    max_redeliveries: u32,
}

impl Worker {
    /// A worker serving through `client`'s connection (its relay calls use the same client).
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder {
            client,
            filter: None,
            concurrency: DEFAULT_CONCURRENCY,
            prefetch: None,
            grace: DEFAULT_GRACE,
            queue_type: QueueType::Classic,
            max_body: DEFAULT_MAX_BODY,
            max_redeliveries: DEFAULT_MAX_REDELIVERIES,
        }
    }

    /// The tasks it serves.
    pub fn tasks(&self) -> &[&'static Registration] {
        &self.tasks
    }

    /// Serves until `shutdown` resolves, then drains (see the [module documentation](self)).
    ///
    /// Returns `Ok` once drained, [`Error::GraceExpired`] if tasks were still running when the
    /// grace period ran out (they will be redelivered), or an error if the topology could not be
    /// declared at start-up. A connection lost later is re-established with backoff.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let Worker {
            client,
            tasks,
            settings,
        } = self;
        let mut queues: BTreeMap<String, Vec<&'static Registration>> = BTreeMap::new();
        for task in &tasks {
            queues
                .entry(client.queue_name(task.queue()))
                .or_default()
                .push(task);
        }
        tracing::info!(
            url = %client.url_redacted(),
            concurrency = settings.concurrency,
            prefetch = settings.prefetch,
            "amqp-tasks worker {} serving {} task(s) on {} queue(s)",
            env!("CARGO_PKG_VERSION"),
            tasks.len(),
            queues.len()
        );
        for task in &tasks {
            tracing::info!(
                "  {}  [queue {}]",
                task.describe(),
                client.queue_name(task.queue())
            );
        }
        let shared = Arc::new(Shared {
            abandon: watch::Sender::new(false),
            semaphore: Arc::new(Semaphore::new(settings.concurrency)),
            in_flight: Arc::new(InFlight::default()),
            client,
            settings,
        });

        let mut shutdown = std::pin::pin!(shutdown);
        let mut first = true;
        let mut backoff = Backoff::default();
        loop {
            // Between sessions, tasks of the lost one may still run: drain them too.
            let session = tokio::select! {
                session = shared.client.session() => session,
                () = &mut shutdown => return drain(&shared, Vec::new()).await,
            };
            let session = match session {
                Ok(session) => session,
                Err(error) => {
                    let delay = backoff.next();
                    tracing::warn!(%error, retry_in = ?delay, "cannot reach the broker");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = &mut shutdown => return drain(&shared, Vec::new()).await,
                    }
                }
            };
            let consumers = match open_consumers(&shared, &session, &queues).await {
                Ok(consumers) => consumers,
                Err(error) if first => return Err(error),
                Err(error) => {
                    let delay = backoff.next();
                    tracing::warn!(%error, retry_in = ?delay, "cannot resume consuming");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = &mut shutdown => return drain(&shared, Vec::new()).await,
                    }
                }
            };
            first = false;
            backoff = Backoff::default();
            tracing::info!("worker ready: consuming {} queue(s)", consumers.len());
            let (ended, closings) = run(&shared, &session, consumers, &mut shutdown).await;
            match ended {
                Ended::Shutdown => return drain(&shared, closings).await,
                Ended::Lost(reason) => {
                    tracing::warn!(%reason, "consumers stopped; resuming");
                    tokio::spawn(close_all(closings));
                }
            }
        }
    }
}

impl WorkerBuilder {
    /// Tasks running at once in the whole process, across all queues (default 64). A task
    /// waiting on `.call(&ctx)` does not count.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Unacked deliveries per consumer (default: `concurrency`, at most 256). Deliveries beyond
    /// what can run wait prefetched; keep it small so that competing workers share the load.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }

    /// How long tasks in flight may take to finish after shutdown is asked (default 30 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves only the named tasks (default: every registered task).
    pub fn tasks<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.filter = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Declares task queues as this type (default classic).
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Bodies larger than this are rejected and dead-lettered (default 16 MiB).
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// How often a message may come back redelivered (its worker died running it) before it is
    /// dead-lettered as a poison message instead of run again (default 5; see
    /// [`wire`](crate::wire#redeliveries)).
    pub fn max_redeliveries(mut self, limit: u32) -> Self {
        self.max_redeliveries = limit;
        self
    }

    /// Checks the configuration: refuses duplicate task names, an empty set of tasks and
    /// unknown names in the filter.
    pub fn build(self) -> Result<Worker, Error> {
        let tasks = registry::select(&registry::tasks(), self.filter.as_deref())?;
        for task in &tasks {
            topology::check_name(&self.client.queue_name(task.queue()))
                .map_err(|e| Error::Config(format!("queue of task `{}`: {e}", task.name())))?;
        }
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| u16::try_from(self.concurrency.min(256)).unwrap_or(256));
        Ok(Worker {
            client: self.client,
            tasks,
            settings: Settings {
                concurrency: self.concurrency,
                prefetch,
                grace: self.grace,
                queue_type: self.queue_type,
                max_body: self.max_body,
                max_redeliveries: self.max_redeliveries,
            },
        })
    }

    /// [`build`](Self::build)s, then [`serve`](Worker::serve)s until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        self.build()?.serve(shutdown).await
    }
}

/// Declares the queues of `tasks` and the delay queues (what a worker does at start-up), for
/// provisioning ahead of deployment. Returns the task queues.
pub(crate) async fn declare(
    client: &Client,
    tasks: &[&'static Registration],
    queue_type: QueueType,
) -> Result<Vec<String>, Error> {
    let broker = |action: String| move |source| Error::Broker { action, source };
    let session = client
        .session()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(broker("opening a channel".to_owned()))?;
    topology::declare_delays(&channel, client.namespace())
        .await
        .map_err(broker("declaring the delay queues".to_owned()))?;
    let mut queues: Vec<String> = tasks.iter().map(|t| client.queue_name(t.queue())).collect();
    queues.sort();
    queues.dedup();
    for queue in &queues {
        topology::declare_task_queue(&channel, queue, queue_type)
            .await
            .map_err(broker(format!("declaring `{queue}`")))?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(queues)
}

struct Shared {
    client: Client,
    /// Set when the grace period ran out: handlers still running stop where they are.
    abandon: watch::Sender<bool>,
    semaphore: Arc<Semaphore>,
    in_flight: Arc<InFlight>,
    settings: Settings,
}

/// What a handler needs to know about its queue.
struct QueueState {
    name: String,
    tasks: Vec<&'static Registration>,
    channel: Channel,
    acks: AckSender,
}

struct QueueConsumer {
    state: Arc<QueueState>,
    consumer: Consumer,
    acker: tokio::task::JoinHandle<()>,
}

enum Ended {
    Shutdown,
    Lost(String),
}

async fn open_consumers(
    shared: &Shared,
    session: &Session,
    queues: &BTreeMap<String, Vec<&'static Registration>>,
) -> Result<Vec<QueueConsumer>, Error> {
    let broker = |action: String| move |source| Error::Broker { action, source };
    let mut consumers = Vec::with_capacity(queues.len());
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(broker("opening a channel".to_owned()))?;
    topology::declare_delays(&channel, shared.client.namespace())
        .await
        .map_err(broker("declaring the delay queues".to_owned()))?;
    let _ = channel.close(200, "declared".into()).await;
    for (queue, tasks) in queues {
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(broker(format!("opening a channel for `{queue}`")))?;
        topology::declare_task_queue(&channel, queue, shared.settings.queue_type)
            .await
            .map_err(broker(format!(
                "declaring `{queue}` and its dead-letter queue"
            )))?;
        channel
            .basic_qos(shared.settings.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(broker(format!("setting the prefetch of `{queue}`")))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!("consuming `{queue}`")))?;
        let (acks, acker) = acker::spawn(channel.clone());
        consumers.push(QueueConsumer {
            state: Arc::new(QueueState {
                name: queue.clone(),
                tasks: tasks.clone(),
                channel,
                acks,
            }),
            consumer,
            acker,
        });
    }
    Ok(consumers)
}

async fn run(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    consumers: Vec<QueueConsumer>,
    shutdown: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
) -> (Ended, Vec<Closing>) {
    let (stop, stopped) = watch::channel(false);
    let mut closings = Vec::new();
    let mut loops = JoinSet::new();
    for consumer in consumers {
        loops.spawn(consume(shared.clone(), consumer, stopped.clone()));
    }
    let ended = tokio::select! {
        () = shutdown.as_mut() => Ended::Shutdown,
        reason = session.lost() => Ended::Lost(reason),
        Some(Ok((reason, closing))) = loops.join_next() => {
            closings.push(closing);
            Ended::Lost(reason)
        }
    };
    let _ = stop.send(true);
    while let Some(result) = loops.join_next().await {
        closings.extend(result.ok().map(|(_, closing)| closing));
    }
    (ended, closings)
}

/// A channel to close once its acker has sent the last acks.
struct Closing {
    channel: Channel,
    acker: tokio::task::JoinHandle<()>,
}

async fn close_all(closings: Vec<Closing>) {
    for Closing { channel, acker } in closings {
        // The acker ends once every handler of the channel has settled.
        let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
        let _ = channel.close(200, "worker stopping".into()).await;
    }
}

/// Receives deliveries of one queue and starts a handler for each once a slot is free.
async fn consume(
    shared: Arc<Shared>,
    consumer: QueueConsumer,
    mut stop: watch::Receiver<bool>,
) -> (String, Closing) {
    let QueueConsumer {
        state,
        mut consumer,
        acker,
    } = consumer;
    // One stop future for the whole loop, not a new registration per delivery.
    let stopped = stop.wait_for(|stop| *stop);
    tokio::pin!(stopped);
    let reason = loop {
        let delivery = tokio::select! {
            biased;
            _ = &mut stopped => break None,
            item = next(&mut consumer) => match item {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => break Some(format!("consumer of `{}`: {error}", state.name)),
                None => break Some(format!("the broker cancelled the consumer of `{}`", state.name)),
            },
        };
        let permit = match shared.semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => break None,
            Err(tokio::sync::TryAcquireError::NoPermits) => tokio::select! {
                biased;
                _ = &mut stopped => {
                    state.acks.send(Settle::Requeue(delivery.delivery_tag));
                    break None;
                }
                permit = shared.semaphore.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break None,
                },
            },
        };
        let guard = shared.in_flight.enter();
        tokio::spawn(process::handle(
            shared.clone(),
            state.clone(),
            delivery,
            permit,
            guard,
        ));
    };
    if reason.is_none() {
        // Shutdown: no more deliveries; those already prefetched go back to the queue.
        let _ = state
            .channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let drain = async {
            while let Some(Ok(delivery)) = next(&mut consumer).await {
                state.acks.send(Settle::Requeue(delivery.delivery_tag));
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
    let closing = Closing {
        channel: state.channel.clone(),
        acker,
    };
    (reason.unwrap_or_else(|| "stopped".to_owned()), closing)
}

async fn drain(shared: &Shared, closings: Vec<Closing>) -> Result<(), Error> {
    let running = shared.in_flight.count();
    if running > 0 {
        tracing::info!(running, grace = ?shared.settings.grace, "waiting for tasks in flight");
    }
    let finished = tokio::time::timeout(shared.settings.grace, shared.in_flight.idle())
        .await
        .is_ok();
    let running_at_expiry = shared.in_flight.count();
    if !finished {
        // Cancel what still runs; closing the channels returns its deliveries to the queues.
        let _ = shared.abandon.send(true);
        for closing in &closings {
            closing.acker.abort();
        }
    }
    close_all(closings).await;
    if finished {
        tracing::info!("worker stopped");
        Ok(())
    } else {
        Err(Error::GraceExpired(
            shared.settings.grace,
            running_at_expiry,
        ))
    }
}

/// Handlers running (and settling) now.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Exponential backoff with jitter for reconnecting: 100 ms doubling to 5 s.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = 100u64.saturating_mul(1 << self.attempt.min(6)).min(5_000);
        self.attempt += 1;
        let jitter = (crate::trace::random_u64() & 0xff) * base / 1024;
        Duration::from_millis(base + jitter)
    }
}

/// The longest delay before retry `retry` (1-based): `backoff × 2^(retry-1)`, plus 25% jitter.
pub(crate) fn backoff_ceiling(backoff: Duration, retry: u32) -> Duration {
    let base = backoff.saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    base.saturating_add(base / 4)
}
