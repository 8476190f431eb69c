//! The worker layer: serves every task linked into the binary (or a chosen subset). It owns the
//! [`registry`], the supervisor that keeps one broker session consuming (reconnecting with the
//! crate's one retry policy), the consumers, the pipeline of one delivery (admit → execute →
//! decide → dispose → settle), the [`dlq`] tools and, behind the `cli` feature, the `worker`
//! binary's command line. It builds on every layer below and nothing builds on it.
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
//!
//! # Metrics
//!
//! With [`WorkerBuilder::metrics_addr`] (`worker --metrics-addr`, env `AMQP_TASKS_METRICS_ADDR`;
//! feature `metrics`, on by default) the worker serves `GET /metrics` in the Prometheus text
//! format: `amqp_tasks_tasks_total{task, outcome}` (each message settled for good, with its
//! outcome: `succeeded`, `retried`, `failed`, `panicked`, `time_limit`, `rejected`, `revoked`),
//! `amqp_tasks_dead_letters_total{task, reason}` (counted apart: a failed or rejected message may
//! also be dead-lettered), `amqp_tasks_task_duration_seconds{task}` (a histogram of handler run
//! times), `amqp_tasks_tasks_in_flight`, `amqp_tasks_redeliveries_total{task}` and
//! `amqp_tasks_broker_sessions_total`.

pub(crate) mod admit;
pub(crate) mod beat;
#[cfg(feature = "cli")]
pub(crate) mod cli;
mod consume;
pub(crate) mod control;
pub(crate) mod delivery;
pub(crate) mod dispose;
pub mod dlq;
pub(crate) mod events;
pub(crate) mod execute;
#[cfg(feature = "cli")]
mod log_fields;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
pub(crate) mod observe;
pub(crate) mod presence;
pub mod registry;
pub(crate) mod revoke;
pub(crate) mod settle;
mod store;

#[cfg(feature = "cli")]
pub use cli::{SetupResult, main, main_with};

use crate::client::Client;
use crate::error::{BrokerError, Error};
use crate::protocol::headers::HeaderBudget;
use crate::protocol::retry::RetryPolicy;
use crate::protocol::topology::{self, QueueType};
use crate::state::{StateValue, States};
use crate::transport::topology::{declare_delays, declare_task_queue};
use consume::{Ended, close_all, drain, open_consumers, run};
use lapin::Channel;
use presence::Presence;
use registry::Registration;
use settle::AckSender;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, RwLock, Semaphore, watch};

/// How long declaring the topology and starting the consumers of a session may take.
const OPEN_PATIENCE: Duration = Duration::from_secs(15);
/// How long a worker waits, at start-up, to have read the revocations stream.
const REVOCATIONS_PATIENCE: Duration = Duration::from_secs(15);

/// Default of [`WorkerBuilder::concurrency`].
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default of [`WorkerBuilder::grace_period`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default of [`WorkerBuilder::max_body_size`].
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;
/// Default of [`WorkerBuilder::max_redeliveries`].
pub const DEFAULT_MAX_REDELIVERIES: u32 = 5;

/// A configured worker; see the [module documentation](self).
#[derive(Debug)]
pub struct Worker {
    client: Client,
    tasks: Vec<&'static Registration>,
    settings: Settings,
    states: Arc<States>,
}

#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) concurrency: usize,
    pub(crate) prefetch: u16,
    pub(crate) grace: Duration,
    pub(crate) queue_type: QueueType,
    pub(crate) max_body: usize,
    pub(crate) max_redeliveries: u32,
    pub(crate) beat: bool,
    #[cfg(feature = "metrics")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    pub(crate) events: bool,
}

/// Configures a [`Worker`].
#[must_use]
#[derive(Debug)]
pub struct WorkerBuilder {
    client: Client,
    filter: Option<Vec<String>>,
    concurrency: usize,
    prefetch: Option<u16>,
    grace: Duration,
    queue_type: QueueType,
    max_body: usize,
    max_redeliveries: u32,
    beat: bool,
    states: States,
    #[cfg(feature = "metrics")]
    metrics_addr: Option<std::net::SocketAddr>,
    events: bool,
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
            beat: false,
            states: States::default(),
            #[cfg(feature = "metrics")]
            metrics_addr: None,
            events: false,
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
            states,
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
        let beat = if settings.beat {
            let plans = beat::plans(&tasks)?;
            if plans.is_empty() {
                tracing::warn!("--beat: none of the tasks served is periodic; not a scheduler");
                None
            } else {
                match client.sibling(beat::HEARTBEAT, "scheduler") {
                    Some(scheduler) => Some((scheduler?, plans)),
                    None => None,
                }
            }
        } else {
            None
        };
        let control = Arc::new(control::Control::new(
            events::worker_id(),
            tasks.iter().map(|t| t.name()).collect(),
            settings.concurrency,
        ));
        // A `--beat` worker is a candidate from its first answer on: its scheduler starts once
        // its consumers are open, but `inspect` answers before that.
        if beat.is_some() {
            control.set_scheduler(control::SchedulerRole::Candidate);
        }
        let _control_listener = AbortOnDrop(tokio::spawn(control::listen(
            client.clone(),
            control.clone(),
        )));
        // Revoked tasks are known before any task is taken (bounded: a broker that cannot
        // serve the stream does not keep the worker from serving).
        let revocations = Arc::new(revoke::Revocations::default());
        let _revocations_reader = AbortOnDrop(tokio::spawn(revoke::follow(
            client.clone(),
            revocations.clone(),
            control.clone(),
        )));
        if !revocations.ready(REVOCATIONS_PATIENCE).await {
            tracing::warn!(
                "the revocations stream could not be read within {REVOCATIONS_PATIENCE:?}; serving without it for now"
            );
        }
        #[allow(unused_mut)]
        let mut observer = observe::Observer {
            events: settings.events.then(|| events::Events::start(&client)),
            control: Some(control.clone()),
            ..observe::Observer::default()
        };
        #[cfg(feature = "metrics")]
        let _metrics_server = match settings.metrics_addr {
            Some(addr) => {
                let metrics = Arc::new(metrics::Metrics::new());
                let (_, server) = metrics::serve(metrics.clone(), addr).await?;
                observer.metrics = Some(metrics);
                Some(AbortOnDrop(server))
            }
            None => None,
        };
        let scheduler_control = control;
        let shared = Arc::new(Shared {
            observer,
            revocations,
            stopping: watch::Sender::new(false),
            abandon: watch::Sender::new(false),
            semaphore: Arc::new(Semaphore::new(settings.concurrency)),
            gate: Arc::new(RwLock::new(())),
            in_flight: Arc::new(InFlight::default()),
            presence: Presence::default(),
            client,
            settings,
            states,
        });

        // The scheduler starts once the task queues exist (its ticks go there), and stops,
        // handing its token on, as soon as the worker stops, however `serve` returns.
        let mut beat = beat;
        let _stop_beat = StopOnDrop(shared.clone());

        let mut shutdown = std::pin::pin!(shutdown);
        let mut first = true;
        let mut online = false;
        let mut attempt = 0;
        loop {
            // Between sessions, tasks of the lost one may still run: drain them too.
            let session = tokio::select! {
                session = shared.client.session() => session,
                () = &mut shutdown => return drain(&shared, Vec::new()).await,
            };
            let session = match session {
                Ok(session) => session,
                Err(error) => {
                    attempt += 1;
                    let delay = RetryPolicy::RECONNECT.delay(attempt);
                    tracing::warn!(%error, retry_in = ?delay, "cannot reach the broker");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = &mut shutdown => return drain(&shared, Vec::new()).await,
                    }
                }
            };
            // Declaring and consuming is bounded too: a broker that stops answering mid-way
            // ends this session, and the next attempt opens a new one.
            let opened = tokio::select! {
                opened = tokio::time::timeout(OPEN_PATIENCE, open_consumers(&shared, &session, &queues)) => opened,
                reason = session.lost() => Ok(Err(Error::Config(format!("the session was lost: {reason}")))),
                () = &mut shutdown => return drain(&shared, Vec::new()).await,
            };
            let opened = opened.unwrap_or_else(|_| {
                Err(Error::Config(format!(
                    "declaring and consuming took longer than {OPEN_PATIENCE:?}"
                )))
            });
            let consumers = match opened {
                Ok(consumers) => consumers,
                Err(error) if first => return Err(error),
                Err(error) => {
                    session.mark_lost(format!("cannot resume consuming: {error}"));
                    attempt += 1;
                    let delay = RetryPolicy::RECONNECT.delay(attempt);
                    tracing::warn!(%error, retry_in = ?delay, "cannot resume consuming");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = &mut shutdown => return drain(&shared, Vec::new()).await,
                    }
                }
            };
            first = false;
            attempt = 0;
            shared.observer.session_started();
            if !online {
                online = true;
                shared.observer.online();
            }
            tracing::info!(
                node = %session.url,
                "worker ready: consuming {} queue(s) and their redelivered lanes",
                consumers.len() / 2
            );
            if let Some((scheduler, plans)) = beat.take() {
                tokio::spawn(beat::run(
                    scheduler,
                    plans,
                    scheduler_control.clone(),
                    shared.stopping.subscribe(),
                ));
            }
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

    /// Makes this worker a candidate scheduler of the periodic tasks it serves (`worker
    /// --beat`): any number of workers may be; the broker elects one active at a time (see
    /// [`topology`](crate::topology#the-schedulers-election-queue) and the README's "Periodic
    /// tasks"). Default off.
    pub fn beat(mut self, beat: bool) -> Self {
        self.beat = beat;
        self
    }

    /// Gives the tasks that take a `State<T>` parameter this value (one per type; a second
    /// value of the same type replaces the first). Cheap to share: every task gets a
    /// [`State`](crate::State) handle on the same value.
    ///
    /// ```no_run
    /// # struct Db; impl Db { async fn connect() -> Db { Db } }
    /// # async fn serve(client: amqp_tasks::Client) -> Result<(), amqp_tasks::Error> {
    /// let db = Db::connect().await;
    /// amqp_tasks::Worker::builder(client)
    ///     .state(db)
    ///     .serve(std::future::pending())
    ///     .await
    /// # }
    /// ```
    pub fn state<T: StateValue>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// Serves Prometheus metrics at `http://ADDR/metrics` while the worker serves (default: no
    /// metrics). A port 0 picks a free port; the address bound is logged. See the
    /// [`metrics`](self#metrics) section for the samples. Feature `metrics` (default).
    #[cfg(feature = "metrics")]
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Publishes task and worker events as JSON to the namespaced topic exchange
    /// `amqp-tasks.events` (default off; `worker --events`): for each message `received`,
    /// `started`, then its outcome (`succeeded`, `retried`, `failed`, `panicked`, `time_limit`,
    /// `rejected`, `revoked`) and `dead_lettered`, under `task.<event>.<task name>`; `online`,
    /// `heartbeat` (every 10 s) and `offline` under `worker.<event>`. Fire-and-forget: never
    /// awaited by a task, dropped rather than slowing one down.
    pub fn events(mut self, on: bool) -> Self {
        self.events = on;
        self
    }

    /// Checks the configuration: refuses duplicate task names, an empty set of tasks, unknown
    /// names in the filter, and a task whose `State<T>` was not given ([`Error::MissingState`]).
    pub fn build(self) -> Result<Worker, Error> {
        let tasks = registry::select(&registry::tasks(), self.filter.as_deref())?;
        for task in &tasks {
            if let Some(missing) = self.states.missing(task.states()) {
                return Err(Error::MissingState {
                    task: task.name().to_owned(),
                    state: missing.name.to_owned(),
                });
            }
        }
        self.assemble(tasks)
    }

    /// What provisioning needs (`worker declare`): the queues, not the states.
    pub(crate) fn build_for_declare(self) -> Result<Worker, Error> {
        let tasks = registry::select(&registry::tasks(), self.filter.as_deref())?;
        self.assemble(tasks)
    }

    fn assemble(self, tasks: Vec<&'static Registration>) -> Result<Worker, Error> {
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
                beat: self.beat,
                #[cfg(feature = "metrics")]
                metrics_addr: self.metrics_addr,
                events: self.events,
            },
            states: Arc::new(self.states),
        })
    }

    /// [`build`](Self::build)s, then [`serve`](Worker::serve)s until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        self.build()?.serve(shutdown).await
    }
}

impl Worker {
    /// Declares the queues of its tasks and the delay queues (what it does when it starts
    /// serving), for provisioning ahead of deployment (`worker declare`). Returns the task queues.
    pub async fn declare(&self) -> Result<Vec<String>, Error> {
        let client = &self.client;
        let broker = |action: String| {
            move |source| Error::Broker {
                action,
                source: BrokerError::new(source),
            }
        };
        let session = client
            .session()
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(broker("opening a channel".to_owned()))?;
        declare_delays(&channel, client.namespace(), self.settings.queue_type)
            .await
            .map_err(broker("declaring the delay queues".to_owned()))?;
        let mut queues: Vec<String> = self
            .tasks
            .iter()
            .map(|t| client.queue_name(t.queue()))
            .collect();
        queues.sort();
        queues.dedup();
        for queue in &queues {
            declare_task_queue(&channel, queue, self.settings.queue_type)
                .await
                .map_err(broker(format!("declaring `{queue}`")))?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(queues)
    }
}

/// Tells everything that watches [`Shared::stopping`] (the scheduler) to stop, when dropped.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stopping.send(true);
    }
}

/// What every handler of this worker shares.
pub(crate) struct Shared {
    pub(crate) client: Client,
    /// Set when shutdown was asked: waits give way, deliveries not started are given back.
    pub(crate) stopping: watch::Sender<bool>,
    /// Set when the grace period ran out: handlers still running stop where they are.
    pub(crate) abandon: watch::Sender<bool>,
    pub(crate) semaphore: Arc<Semaphore>,
    /// Held shared by every running task, exclusively by one that must run alone.
    pub(crate) gate: Arc<RwLock<()>>,
    pub(crate) in_flight: Arc<InFlight>,
    pub(crate) presence: Presence,
    pub(crate) settings: Settings,
    /// What the tasks' `State` parameters receive.
    pub(crate) states: Arc<States>,
    /// Where reports on the messages handled go (metrics, events).
    pub(crate) observer: observe::Observer,
    /// The task ids revoked.
    pub(crate) revocations: Arc<revoke::Revocations>,
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Which of a task queue's two consumers a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The task queue itself: tasks run side by side.
    Main,
    /// Its redelivered lane (`<queue>.redelivered`): one at a time, each alone in this worker.
    Redelivered,
}

/// What a handler needs to know about its queue.
pub(crate) struct QueueState {
    /// The queue consumed: the task queue, or its redelivered lane.
    pub(crate) name: String,
    /// The task queue (where retries go, whose `.dlq` takes the dead letters).
    pub(crate) main: String,
    pub(crate) lane: Lane,
    /// Its consumer's prefetch.
    pub(crate) prefetch: u16,
    pub(crate) tasks: Vec<&'static Registration>,
    pub(crate) channel: Channel,
    pub(crate) acks: AckSender,
    /// What the session's frames can carry in headers.
    pub(crate) budget: HeaderBudget,
    /// Whether dead letters can be published to its `.dlq` right now.
    pub(crate) dead_letters: Health,
}

/// How an outbound path (publishing dead letters) has been doing: consecutive failures drive a
/// backoff, and the log says so once per interval rather than once per message.
#[derive(Debug, Default)]
pub(crate) struct Health {
    failures: AtomicU32,
    logged: std::sync::Mutex<Option<(tokio::time::Instant, u64)>>,
}

impl Health {
    /// How long to hold a message before giving it back, after another failure.
    pub(crate) fn failed(&self) -> Duration {
        let failures = self
            .failures
            .fetch_add(1, Ordering::SeqCst)
            .saturating_add(1);
        RetryPolicy {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
        .delay(failures)
    }

    pub(crate) fn succeeded(&self) {
        self.failures.store(0, Ordering::SeqCst);
    }

    /// Whether to log this failure (at most once per 10 s), and how many were not logged since.
    pub(crate) fn should_log(&self) -> Option<u64> {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        match &mut *logged {
            Some((at, suppressed)) if now.duration_since(*at) < Duration::from_secs(10) => {
                *suppressed += 1;
                None
            }
            other => {
                let suppressed = other.map_or(0, |(_, suppressed)| suppressed);
                *other = Some((now, 0));
                Some(suppressed)
            }
        }
    }
}

/// Handlers running (and settling) now.
#[derive(Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

pub(crate) struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub(crate) fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub(crate) async fn idle(&self) {
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
