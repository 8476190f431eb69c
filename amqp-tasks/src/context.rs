//! [`Context`]: what a running task knows about itself (its id, attempt, redelivery, deadline,
//! trace), given to it by the worker running it, and a [`Caller`](crate::Caller) for the tasks it
//! calls, which inherit its deadline, trace and concurrency slot through the client layer.

use crate::client::Client;
use crate::client::caller::{Origin, Parent, Slot, sealed};
use crate::protocol::trace::TraceParent;
use crate::results::{Results, Write};
use crate::state::{State, States};
use crate::task::TaskId;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Given to a task whose first parameter has this type, by the worker running it.
///
/// It is a [`Caller`](crate::Caller): `.call(&ctx)` inherits the remaining deadline and the trace;
/// `.delay(&ctx)` inherits the trace only. While a task awaits a `.call(&ctx)`, its concurrency
/// slot is lent back to the worker, so a relay calling a task served by the same process cannot
/// deadlock it.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    states: Arc<States>,
    parent: Parent,
    task_name: &'static str,
    attempt: u32,
    redelivered: bool,
    parent_id: Option<TaskId>,
    results: Option<Results>,
}

/// What the worker knows of a task it is about to run.
pub(crate) struct ContextParts {
    pub(crate) client: Client,
    /// What the worker was given for its tasks' `State` parameters.
    pub(crate) states: Arc<States>,
    pub(crate) task_id: TaskId,
    pub(crate) task_name: &'static str,
    pub(crate) attempt: u32,
    pub(crate) redelivered: bool,
    pub(crate) deadline: Option<Instant>,
    pub(crate) root_id: Option<TaskId>,
    pub(crate) parent_id: Option<TaskId>,
    pub(crate) trace: TraceParent,
    pub(crate) slot: Option<Arc<Slot>>,
    /// Where `progress` is written (none for a task with `store_result = false`).
    pub(crate) results: Option<Results>,
}

impl Context {
    pub(crate) fn new(parts: ContextParts) -> Context {
        let root_id = parts.root_id.unwrap_or_else(|| parts.task_id.clone());
        Context {
            inner: Arc::new(Inner {
                client: parts.client,
                states: parts.states,
                parent: Parent {
                    task_id: parts.task_id,
                    root_id,
                    trace: parts.trace,
                    deadline: parts.deadline,
                    slot: parts.slot,
                },
                task_name: parts.task_name,
                attempt: parts.attempt,
                redelivered: parts.redelivered,
                parent_id: parts.parent_id,
                results: parts.results,
            }),
        }
    }

    /// A context for running a task function directly, outside a worker: a fresh task id and
    /// trace, no deadline, no states. [`testing::TestWorker`](crate::testing::TestWorker) runs
    /// tasks as a worker would, states and all.
    pub fn detached(client: &Client) -> Context {
        Context::new(ContextParts {
            client: client.clone(),
            states: Arc::default(),
            task_id: TaskId::new(),
            task_name: "",
            attempt: 1,
            redelivered: false,
            deadline: None,
            root_id: None,
            parent_id: None,
            trace: TraceParent::new_root(),
            slot: None,
            results: None,
        })
    }

    /// Reports how far the task is (`fraction`, 0.0 to 1.0) with a message, for
    /// [`Client::status`](crate::Client::status) to show while it runs. Written to the worker's
    /// result store in the background: it never waits for the store, and a failed write is
    /// logged, never the task's failure. Nothing happens without a store.
    pub async fn progress(&self, fraction: f32, message: impl Into<String>) {
        if let Some(results) = &self.inner.results {
            results.write(Write::Progress {
                id: self.inner.parent.task_id.to_string(),
                fraction: if fraction.is_nan() {
                    0.0
                } else {
                    fraction.clamp(0.0, 1.0)
                },
                message: message.into(),
                at: std::time::SystemTime::now(),
            });
        }
    }

    /// The task id: the same for every attempt and replay of this task.
    pub fn task_id(&self) -> &TaskId {
        &self.inner.parent.task_id
    }

    /// The task name.
    pub fn task_name(&self) -> &str {
        self.inner.task_name
    }

    /// The attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// True when the broker delivered this message before (a worker died or disconnected while
    /// running it): the task may have run partly already.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// When the caller stops waiting, if it waits (`.call()`); `None` for `.delay()`.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.parent.deadline
    }

    /// Time left until the deadline (zero once passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner.parent.remaining()
    }

    /// The id of the first task of the chain that led here (this task's own id at the root).
    pub fn root_id(&self) -> &TaskId {
        &self.inner.parent.root_id
    }

    /// The id of the task that sent this one, if a task did.
    pub fn parent_id(&self) -> Option<&TaskId> {
        self.inner.parent_id.as_ref()
    }

    /// The W3C trace id shared by every hop of this chain.
    pub fn trace_id(&self) -> &str {
        self.inner.parent.trace.trace_id()
    }

    /// The client this task's worker uses, to send tasks without inheriting anything.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The worker's state of type `T`, if it was given one.
    pub(crate) fn state<T: Send + Sync + 'static>(&self) -> Option<State<T>> {
        self.inner.states.get::<T>()
    }
}

impl sealed::Sealed for Context {
    fn origin(&self) -> Origin<'_> {
        Origin {
            client: &self.inner.client,
            parent: Some(&self.inner.parent),
        }
    }
}
impl crate::client::Caller for Context {}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("task_id", self.task_id())
            .field("task_name", &self.inner.task_name)
            .field("attempt", &self.inner.attempt)
            .field("redelivered", &self.inner.redelivered)
            .field("remaining", &self.remaining())
            .field("trace_id", &self.trace_id())
            .finish()
    }
}
