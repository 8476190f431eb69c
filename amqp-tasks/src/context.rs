//! [`Context`]: what a running task knows about itself, and a [`Caller`](crate::Caller) for the
//! tasks it calls.

use crate::client::Client;
use crate::task::TaskId;
use crate::trace::TraceParent;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    task_id: TaskId,
    task_name: &'static str,
    attempt: u32,
    redelivered: bool,
    deadline: Option<Instant>,
    root_id: TaskId,
    parent_id: Option<TaskId>,
    trace: TraceParent,
    slot: Option<Arc<Slot>>,
}

pub(crate) struct ContextParts {
    pub client: Client,
    pub task_id: TaskId,
    pub task_name: &'static str,
    pub attempt: u32,
    pub redelivered: bool,
    pub deadline: Option<Instant>,
    pub root_id: Option<TaskId>,
    pub parent_id: Option<TaskId>,
    pub trace: TraceParent,
    pub slot: Option<Arc<Slot>>,
}

impl Context {
    pub(crate) fn new(parts: ContextParts) -> Context {
        let root_id = parts.root_id.unwrap_or_else(|| parts.task_id.clone());
        Context {
            inner: Arc::new(Inner {
                client: parts.client,
                task_id: parts.task_id,
                task_name: parts.task_name,
                attempt: parts.attempt,
                redelivered: parts.redelivered,
                deadline: parts.deadline,
                root_id,
                parent_id: parts.parent_id,
                trace: parts.trace,
                slot: parts.slot,
            }),
        }
    }

    /// A context for running a task function directly, outside a worker (in a unit test of a
    /// relay, say): a fresh task id and trace, no deadline.
    pub fn detached(client: &Client) -> Context {
        Context::new(ContextParts {
            client: client.clone(),
            task_id: TaskId::new(),
            task_name: "",
            attempt: 1,
            redelivered: false,
            deadline: None,
            root_id: None,
            parent_id: None,
            trace: TraceParent::new_root(),
            slot: None,
        })
    }

    /// The task id: the same for every attempt and replay of this task.
    pub fn task_id(&self) -> &TaskId {
        &self.inner.task_id
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
        self.inner.deadline
    }

    /// Time left until the deadline (zero once passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The id of the first task of the chain that led here (this task's own id at the root).
    pub fn root_id(&self) -> &TaskId {
        &self.inner.root_id
    }

    /// The id of the task that sent this one, if a task did.
    pub fn parent_id(&self) -> Option<&TaskId> {
        self.inner.parent_id.as_ref()
    }

    /// The W3C trace id shared by every hop of this chain.
    pub fn trace_id(&self) -> &str {
        self.inner.trace.trace_id()
    }

    pub(crate) fn trace(&self) -> &TraceParent {
        &self.inner.trace
    }

    /// The client this task's worker uses, to send tasks without inheriting anything.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub(crate) fn suspend(&self) -> Suspended {
        if let Some(slot) = &self.inner.slot {
            slot.suspend();
        }
        Suspended {
            slot: self.inner.slot.clone(),
        }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("task_id", &self.inner.task_id)
            .field("task_name", &self.inner.task_name)
            .field("attempt", &self.inner.attempt)
            .field("redelivered", &self.inner.redelivered)
            .field("remaining", &self.remaining())
            .field("trace_id", &self.trace_id())
            .finish()
    }
}

/// A running task's share of the worker's concurrency.
pub(crate) struct Slot {
    semaphore: Arc<Semaphore>,
    state: Mutex<SlotState>,
}

struct SlotState {
    permit: Option<OwnedSemaphorePermit>,
    waiting: usize,
    finished: bool,
}

impl Slot {
    pub fn new(semaphore: Arc<Semaphore>, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            semaphore,
            state: Mutex::new(SlotState {
                permit: Some(permit),
                waiting: 0,
                finished: false,
            }),
        }
    }

    fn suspend(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.waiting += 1;
        if state.waiting == 1 {
            state.permit = None;
        }
    }

    async fn resume(&self) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.waiting -= 1;
            if state.waiting > 0 || state.finished || state.permit.is_some() {
                return;
            }
        }
        let Ok(permit) = self.semaphore.clone().acquire_owned().await else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.finished && state.waiting == 0 && state.permit.is_none() {
            state.permit = Some(permit);
        }
    }

    /// The handler returned: its slot is free whatever clones of the context live on.
    pub fn finish(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.finished = true;
        state.permit = None;
    }
}

pub(crate) struct Suspended {
    slot: Option<Arc<Slot>>,
}

impl Suspended {
    pub async fn resume(self) {
        if let Some(slot) = &self.slot {
            slot.resume().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_task_lends_its_slot() {
        let semaphore = Arc::new(Semaphore::new(1));
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let slot = Slot::new(semaphore.clone(), permit);
        assert_eq!(semaphore.available_permits(), 0);
        slot.suspend();
        slot.suspend();
        assert_eq!(semaphore.available_permits(), 1, "lent while waiting");
        slot.resume().await;
        assert_eq!(semaphore.available_permits(), 1, "still one call in flight");
        slot.resume().await;
        assert_eq!(semaphore.available_permits(), 0, "taken back");
        slot.finish();
        assert_eq!(semaphore.available_permits(), 1);
    }
}
