//! Callers: what a task can be sent from ([`Caller`]: a [`Client`], or a running task's
//! [`Context`](crate::Context)), and what a call inherits from a parent task: its identity, its
//! trace, its remaining deadline, and the concurrency slot it lends back to its worker while it
//! waits (so that a relay calling a task of its own process cannot deadlock it).

use super::Client;
use crate::protocol::trace::TraceParent;
use crate::task::TaskId;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub(crate) mod sealed {
    /// Only this crate's callers.
    pub trait Sealed {
        fn origin(&self) -> super::Origin<'_>;
    }
}

/// Something a task can be sent from: a [`Client`], or the [`Context`](crate::Context) of a
/// running task (then the call inherits its trace and, for `.call()`, its remaining deadline).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot send tasks",
    label = "not a caller",
    note = "send tasks from a `&Client` or from a running task's `&Context`"
)]
pub trait Caller: sealed::Sealed + Sync {}

/// Where a call comes from: the client it is sent through, and the task that sends it, if any.
#[derive(Debug)]
pub struct Origin<'a> {
    pub(crate) client: &'a Client,
    pub(crate) parent: Option<&'a Parent>,
}

impl sealed::Sealed for Client {
    fn origin(&self) -> Origin<'_> {
        Origin {
            client: self,
            parent: None,
        }
    }
}
impl Caller for Client {}

/// What a running task passes on to the tasks it sends.
#[derive(Debug)]
pub(crate) struct Parent {
    pub(crate) task_id: TaskId,
    pub(crate) root_id: TaskId,
    pub(crate) trace: TraceParent,
    pub(crate) deadline: Option<Instant>,
    pub(crate) slot: Option<Arc<Slot>>,
}

impl Parent {
    /// Time left until the deadline (zero once passed); `None` without a deadline.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Lends the parent's slot back to its worker while it waits on a call.
    pub(crate) fn suspend(&self) -> Suspended {
        if let Some(slot) = &self.slot {
            slot.suspend();
        }
        Suspended {
            slot: self.slot.clone(),
        }
    }
}

/// A running task's share of the worker's concurrency.
#[derive(Debug)]
pub(crate) struct Slot {
    semaphore: Arc<Semaphore>,
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    permit: Option<OwnedSemaphorePermit>,
    waiting: usize,
    finished: bool,
}

impl Slot {
    pub(crate) fn new(semaphore: Arc<Semaphore>, permit: OwnedSemaphorePermit) -> Slot {
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
    pub(crate) fn finish(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.finished = true;
        state.permit = None;
    }
}

#[derive(Debug)]
pub(crate) struct Suspended {
    slot: Option<Arc<Slot>>,
}

impl Suspended {
    pub(crate) async fn resume(self) {
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
