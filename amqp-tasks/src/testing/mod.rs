//! Testing without a broker: [`TestWorker`] runs the tasks linked into a test binary in-process,
//! through the worker's own pipeline minus RabbitMQ. It owns the in-memory queue of what was
//! delayed, the table of what is served (linked handlers and mocks), and the stand-in for the
//! broker that a [`Client`] backed by it sends to (its `run` module carries one message through).
//!
//! ```no_run
//! use amqp_tasks::testing::TestWorker;
//! use amqp_tasks::{task, CallError};
//! use std::time::Duration;
//!
//! #[task]
//! pub async fn add(a: i64, b: i64) -> i64 { a + b }
//!
//! #[task(name = "billing.charge")]                    // served by another service
//! pub async fn charge(order: u64) -> Result<String, String>;
//!
//! # async fn test() -> Result<(), CallError<String>> {
//! let test = TestWorker::new()
//!     .mock::<charge>(|(order,)| async move { Ok(format!("receipt {order}")) });
//! assert_eq!(add::new(1, 2).call(&test).await.map_err(CallError::widen)?, 3);
//! assert_eq!(charge::new(7).call(&test).await?, "receipt 7");
//! add::new(1, 2).countdown(Duration::from_secs(60)).delay(&test).await.map_err(CallError::widen)?;
//! assert_eq!(test.run_until_idle().await, 1);        // waits the minute in tokio time
//! # Ok(()) }
//! ```
//!
//! What runs is what a worker runs: the arguments are encoded and decoded with the call's codec,
//! the signature is checked, and the time limit, panics, typed errors, retries with their backoff,
//! countdowns and deadlines behave as on a worker; a relay's `.call(&ctx)` comes back to the test
//! worker (or to a mock). Waits are in tokio time: under `tokio::time::pause()` (or
//! `#[tokio::test(start_paused = true)]`) an hour of backoff takes no wall time. What it does not
//! have is what only a broker does: redeliveries after a crash, the redelivered lane, presence
//! queues, several workers. Test those against RabbitMQ.

mod mock;
mod run;

pub use mock::Mock;

use crate::client::Client;
use crate::client::caller::{Caller, Origin, sealed};
use crate::client::local::{LocalBroker, LocalFuture, LocalMessage};
use crate::error::CallError;
use crate::protocol::reply::Reply;
use crate::state::{StateValue, States};
use crate::task::{Task, TaskId};
use crate::worker::registry::{self, Registration};
use run::{Queued, Step};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::time::Instant;

/// An in-process worker for tests: serves every task linked into the test binary, plus mocks,
/// without a broker. `&TestWorker` is a [`Caller`]: `.call(&test)`, `.delay(&test)`; and
/// [`client`](TestWorker::client) is a [`Client`] backed by it, for code that takes one. See the
/// [module documentation](self).
pub struct TestWorker {
    inner: Arc<Inner>,
}

/// What the test worker and the clients backed by it share.
pub(crate) struct Inner {
    /// Backed by this test worker (through a weak reference: no cycle).
    client: Client,
    served: Mutex<Served>,
    states: Mutex<Arc<States>>,
    /// What was delayed, waiting for [`TestWorker::run_until_idle`]: the first due on top.
    queue: Mutex<BinaryHeap<Reverse<Queued>>>,
    next_seq: AtomicU64,
    runs: AtomicUsize,
    dead_letters: Mutex<Vec<DeadLetter>>,
}

/// The tasks a test worker serves, by name, and the queues that exist (those of the tasks).
#[derive(Default)]
struct Served {
    tasks: BTreeMap<&'static str, Arc<Registration>>,
    /// Names linked twice: calls to them are refused, as a worker would refuse to start.
    conflicts: BTreeMap<&'static str, String>,
}

/// A message that a worker would have dead-lettered (to `<queue>.dlq`), as the test worker
/// recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The task name (empty when the message named none).
    pub task: String,
    /// The task id.
    pub id: TaskId,
    /// Why: the `dead_reason` a worker writes (`task`, `panicked`, `time_limit`, ...).
    pub reason: String,
    /// The error, as in `dead_error`.
    pub error: String,
}

impl TestWorker {
    /// A test worker serving every task linked into this binary (no state, no mock yet).
    pub fn new() -> TestWorker {
        let mut served = Served::default();
        for task in registry::tasks() {
            let registration = Arc::new(task.clone());
            if let Some(first) = served.tasks.insert(task.name(), registration) {
                served.conflicts.insert(
                    task.name(),
                    format!(
                        "two tasks are named `{}`: {} and {}",
                        task.name(),
                        first.location(),
                        task.location()
                    ),
                );
            }
        }
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            client: Client::local(Arc::new(Handle(weak.clone()))),
            served: Mutex::new(served),
            states: Mutex::new(Arc::default()),
            queue: Mutex::new(BinaryHeap::new()),
            next_seq: AtomicU64::new(0),
            runs: AtomicUsize::new(0),
            dead_letters: Mutex::new(Vec::new()),
        });
        TestWorker { inner }
    }

    /// Gives the tasks that take a `State<T>` this value, as
    /// [`WorkerBuilder::state`](crate::WorkerBuilder::state) does.
    #[must_use]
    pub fn state<T: StateValue>(self, value: T) -> Self {
        {
            let mut states = lock(&self.inner.states);
            let mut updated = States::clone(&states);
            updated.insert(value);
            *states = Arc::new(updated);
        }
        self
    }

    /// Serves task `T` with `f` instead of its linked handler (if it has one): a task served
    /// elsewhere, or one whose real work a test wants to replace. `f` takes the argument tuple
    /// (`|(order,)|` for one argument) and returns the task's result; it runs as a handler would,
    /// with the task's codec, time limit, retries and panics caught.
    #[must_use]
    pub fn mock<T: Task>(self, f: impl Mock<T>) -> Self {
        {
            let mut states = lock(&self.inner.states);
            let mut updated = States::clone(&states);
            mock::install::<T>(&mut updated, f);
            *states = Arc::new(updated);
        }
        let mut served = lock(&self.inner.served);
        served.conflicts.remove(T::NAME);
        served
            .tasks
            .insert(T::NAME, Arc::new(mock::registration::<T>()));
        drop(served);
        self
    }

    /// A [`Client`] backed by this test worker (no broker): for code that takes a client.
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// Runs everything enqueued (`.delay()`s, and what the tasks run meanwhile delay or retry),
    /// in the order it is due, waiting in tokio time for each countdown and retry backoff, until
    /// nothing is left. Returns the number of handler runs, retries included.
    pub async fn run_until_idle(&self) -> usize {
        let mut runs = 0;
        while let Some(next) = self.inner.take_next() {
            run::wait_until(next.due).await;
            let ran = run::step(&self.inner, next).await;
            runs += ran.runs;
            match ran.step {
                Step::Again(queued) => self.inner.enqueue(*queued),
                Step::Answered(_) => {}
            }
        }
        runs
    }

    /// How many messages wait to be run by [`run_until_idle`](TestWorker::run_until_idle).
    pub fn pending(&self) -> usize {
        lock(&self.inner.queue).len()
    }

    /// Every handler run so far, through calls and `run_until_idle` alike.
    pub fn runs(&self) -> usize {
        self.inner.runs.load(Ordering::Relaxed)
    }

    /// What a worker would have dead-lettered so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.inner.dead_letters).clone()
    }
}

impl Default for TestWorker {
    fn default() -> Self {
        TestWorker::new()
    }
}

impl fmt::Debug for TestWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let served = lock(&self.inner.served);
        f.debug_struct("TestWorker")
            .field("tasks", &served.tasks.keys().collect::<Vec<_>>())
            .field("pending", &lock(&self.inner.queue).len())
            .field("runs", &self.inner.runs.load(Ordering::Relaxed))
            .finish()
    }
}

impl sealed::Sealed for TestWorker {
    fn origin(&self) -> Origin<'_> {
        Origin {
            client: &self.inner.client,
            parent: None,
        }
    }
}
impl Caller for TestWorker {}

impl Inner {
    /// The task a message names on its queue, or why there is none (as a worker would answer).
    fn find(&self, queue: &str, name: Option<&str>) -> Result<Arc<Registration>, String> {
        let served = lock(&self.served);
        if let Some(conflict) = name.and_then(|name| served.conflicts.get(name)) {
            return Err(conflict.clone());
        }
        let on_queue: Vec<&Arc<Registration>> = served
            .tasks
            .values()
            .filter(|task| self.client.queue_name(task.queue()) == queue)
            .collect();
        let found = match name {
            Some(name) => on_queue.iter().find(|task| task.name() == name),
            None => match on_queue.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        };
        match found {
            Some(task) => Ok(Arc::clone(task)),
            None => {
                let names: Vec<&str> = on_queue.iter().map(|task| task.name()).collect();
                Err(match name {
                    Some(name) => format!(
                        "no task `{name}` is served on queue `{queue}` (it serves: {})",
                        names.join(", ")
                    ),
                    None => format!(
                        "no `task` header, and queue `{queue}` serves several tasks: {}",
                        names.join(", ")
                    ),
                })
            }
        }
    }

    /// The queues that exist: those of the tasks served (a message to another is `NoRoute`).
    fn queues(&self) -> BTreeSet<String> {
        lock(&self.served)
            .tasks
            .values()
            .map(|task| self.client.queue_name(task.queue()))
            .collect()
    }

    fn states(&self) -> Arc<States> {
        lock(&self.states).clone()
    }

    fn enqueue(&self, mut queued: Queued) {
        queued.seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.queue).push(Reverse(queued));
    }

    /// The message due first (the earliest sent among equals).
    fn take_next(&self) -> Option<Queued> {
        lock(&self.queue).pop().map(|Reverse(queued)| queued)
    }

    fn record_dead_letter(&self, letter: DeadLetter) {
        lock(&self.dead_letters).push(letter);
    }

    fn no_route(&self, queue: &str) -> Option<CallError> {
        (!self.queues().contains(queue)).then(|| CallError::NoRoute {
            queue: queue.to_owned(),
        })
    }
}

/// What a [`Client`] backed by a test worker holds: a weak reference, so that the worker's own
/// client does not keep it alive.
#[derive(Debug)]
struct Handle(Weak<Inner>);

impl Handle {
    fn inner(&self) -> Result<Arc<Inner>, CallError> {
        self.0
            .upgrade()
            .ok_or_else(|| CallError::ConnectionLost("the test worker was dropped".to_owned()))
    }
}

impl LocalBroker for Handle {
    fn publish(&self, message: LocalMessage) -> LocalFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            let inner = self.inner()?;
            if let Some(error) = inner.no_route(&message.queue) {
                return Err(error);
            }
            inner.enqueue(Queued::new(message));
            Ok(())
        })
    }

    fn request(
        &self,
        message: LocalMessage,
        deadline: Instant,
    ) -> LocalFuture<'_, Result<Reply, CallError>> {
        Box::pin(async move {
            let inner = self.inner()?;
            if let Some(error) = inner.no_route(&message.queue) {
                return Err(error);
            }
            // Run in a task of its own, as on a worker: a relay's call back into this test
            // worker, or a caller that gives up, does not stop it halfway.
            let serving = tokio::spawn(run::serve_request(inner, Queued::new(message)));
            match tokio::time::timeout_at(deadline, serving).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(join)) => Err(CallError::ConnectionLost(format!(
                    "the test worker's run of the task failed: {join}"
                ))),
                Err(_) => Err(CallError::Timeout),
            }
        })
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestWorker").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
