//! Callers: what a task can be sent from ([`Caller`]: a [`Client`], or a running task's
//! [`Context`](crate::Context)), and what a call inherits from a parent task: its identity, its
//! trace, its remaining deadline, and the concurrency slot it lends back to its worker while it
//! waits (so that a relay calling a task of its own process cannot deadlock it).

use super::Client;
use crate::protocol::trace::TraceParent;
use crate::task::TaskId;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{
    OwnedRwLockReadGuard, OwnedRwLockWriteGuard, OwnedSemaphorePermit, RwLock, Semaphore,
};
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

/// A running task's share of the worker's concurrency: its permit of the worker's semaphore and
/// its hold on the worker's gate (shared for ordinary tasks, exclusive for one that must run
/// alone). Both are lent back while the task waits on a call, and taken again after.
#[derive(Debug)]
pub(crate) struct Slot {
    semaphore: Arc<Semaphore>,
    gate: Option<Gate>,
    state: Mutex<SlotState>,
}

/// A lock that every running task holds, shared or (a task that must run alone) exclusive.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    lock: Arc<RwLock<()>>,
    exclusive: bool,
}

/// A hold on a [`Gate`], released when dropped.
#[derive(Debug)]
#[allow(dead_code)] // held for its `Drop`
pub(crate) enum GateGuard {
    Shared(OwnedRwLockReadGuard<()>),
    Exclusive(OwnedRwLockWriteGuard<()>),
}

impl Gate {
    pub(crate) fn new(lock: Arc<RwLock<()>>, exclusive: bool) -> Gate {
        Gate { lock, exclusive }
    }

    pub(crate) async fn enter(&self) -> GateGuard {
        if self.exclusive {
            GateGuard::Exclusive(self.lock.clone().write_owned().await)
        } else {
            GateGuard::Shared(self.lock.clone().read_owned().await)
        }
    }
}

#[derive(Debug)]
struct SlotState {
    permit: Option<OwnedSemaphorePermit>,
    guard: Option<GateGuard>,
    waiting: usize,
    finished: bool,
}

impl Slot {
    pub(crate) fn new(
        semaphore: Arc<Semaphore>,
        permit: OwnedSemaphorePermit,
        gate: Option<(Gate, GateGuard)>,
    ) -> Slot {
        let (gate, guard) = gate.unzip();
        Slot {
            semaphore,
            gate,
            state: Mutex::new(SlotState {
                permit: Some(permit),
                guard,
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
            state.guard = None;
        }
    }

    /// One call of the task ends its wait; true when the slot must be taken back.
    fn end_wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.waiting = state.waiting.saturating_sub(1);
        state.waiting == 0 && !state.finished && state.permit.is_none()
    }

    /// Takes the slot back (once one is free), unless the task has finished or waits again.
    async fn reacquire(&self) {
        let Ok(permit) = self.semaphore.clone().acquire_owned().await else {
            return;
        };
        let guard = match &self.gate {
            Some(gate) => Some(gate.enter().await),
            None => None,
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.finished && state.waiting == 0 && state.permit.is_none() {
            state.permit = Some(permit);
            state.guard = guard;
        }
        // Otherwise the permit and the guard are dropped here: released.
    }

    /// The handler returned: its slot is free whatever clones of the context live on.
    pub(crate) fn finish(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.finished = true;
        state.permit = None;
        state.guard = None;
    }
}

/// Takes a slot back in a task of its own: for a wait that ended without anyone to await it.
fn reacquire_later(slot: Arc<Slot>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move { slot.reacquire().await });
    }
}

/// A parent task's wait on a call. Ended by [`resume`](Suspended::resume), which waits until the
/// slot is taken back; or by being dropped (a call future cancelled, say by a
/// `tokio::time::timeout` around it), after which the slot is taken back as soon as one is free.
/// Either way the slot lent is always taken again, or released once the task has finished.
#[derive(Debug)]
pub(crate) struct Suspended {
    slot: Option<Arc<Slot>>,
}

impl Suspended {
    pub(crate) async fn resume(mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        if slot.end_wait() {
            // Should this future be dropped while it waits, the slot is still taken back.
            let pending = Reacquiring(Some(slot.clone()));
            slot.reacquire().await;
            pending.done();
        }
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && slot.end_wait()
        {
            reacquire_later(slot);
        }
    }
}

/// A reacquire in progress, handed to a task of its own if abandoned.
struct Reacquiring(Option<Arc<Slot>>);

impl Reacquiring {
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Reacquiring {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            reacquire_later(slot);
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
        let slot = Arc::new(Slot::new(semaphore.clone(), permit, None));
        let parent = |slot: &Arc<Slot>| Parent {
            task_id: TaskId::from("t"),
            root_id: TaskId::from("t"),
            trace: TraceParent::new_root(),
            deadline: None,
            slot: Some(slot.clone()),
        };
        let parent = parent(&slot);
        assert_eq!(semaphore.available_permits(), 0);
        let first = parent.suspend();
        let second = parent.suspend();
        assert_eq!(semaphore.available_permits(), 1, "lent while waiting");
        first.resume().await;
        assert_eq!(semaphore.available_permits(), 1, "still one call in flight");
        second.resume().await;
        assert_eq!(semaphore.available_permits(), 0, "taken back");
        slot.finish();
        assert_eq!(semaphore.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_cancelled_wait_takes_the_slot_back_once_one_is_free() {
        let semaphore = Arc::new(Semaphore::new(1));
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let slot = Arc::new(Slot::new(semaphore.clone(), permit, None));
        let parent = Parent {
            task_id: TaskId::from("t"),
            root_id: TaskId::from("t"),
            trace: TraceParent::new_root(),
            deadline: None,
            slot: Some(slot.clone()),
        };
        let waiting = parent.suspend();
        // Someone else runs in the lent slot meanwhile.
        let other = semaphore.clone().acquire_owned().await.unwrap();
        drop(waiting); // the call's future is dropped: no `resume` will come
        tokio::task::yield_now().await;
        assert_eq!(semaphore.available_permits(), 0);
        drop(other);
        // Once it is free, the task that waited has its slot again.
        tokio::time::timeout(Duration::from_secs(5), async {
            while slot.state.lock().unwrap().permit.is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slot is taken back");
        assert_eq!(semaphore.available_permits(), 0);
        slot.finish();
        assert_eq!(
            semaphore.available_permits(),
            1,
            "and released when the task ends"
        );

        // A resume abandoned while it waits for the slot hands the job over too.
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let slot = Arc::new(Slot::new(semaphore.clone(), permit, None));
        let parent = Parent {
            slot: Some(slot.clone()),
            ..parent
        };
        let waiting = parent.suspend();
        let other = semaphore.clone().acquire_owned().await.unwrap();
        let abandoned = tokio::time::timeout(Duration::from_millis(20), waiting.resume()).await;
        assert!(abandoned.is_err(), "no slot free: the resume was waiting");
        drop(other);
        tokio::time::timeout(Duration::from_secs(5), async {
            while slot.state.lock().unwrap().permit.is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slot is taken back");
    }
}
