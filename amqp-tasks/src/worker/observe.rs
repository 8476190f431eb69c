//! Observe: what the worker tells the outside about the messages it handles. The pipeline
//! reports here (a message settled with its outcome, a dead letter, a redelivery, a handler
//! running, a session started), and the observer passes it on to what is turned on: the
//! [`metrics`](super::metrics) (feature `metrics`, `--metrics-addr`) and the
//! [`events`](super::events) (`--events`). With nothing turned on, each report is a branch or two.

use super::QueueState;
use super::control::Control;
use super::delivery::Ended;
use super::events::Events;
use crate::protocol::headers::TaskHeaders;
use lapin::message::Delivery;

#[cfg(feature = "metrics")]
use super::metrics::Metrics;
use std::sync::Arc;

/// Where the worker's reports go.
#[derive(Debug, Default)]
pub(crate) struct Observer {
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<Arc<Metrics>>,
    pub(crate) events: Option<Arc<Events>>,
    /// What `inspect` is answered from.
    pub(crate) control: Option<Arc<Control>>,
}

/// What events say of a message besides its task and outcome (kept only with events on).
#[derive(Debug)]
pub(crate) struct Detail {
    pub(crate) id: String,
    pub(crate) attempt: u32,
    pub(crate) error: Option<String>,
}

/// A handler counted as running (in flight, and active for `inspect`) until dropped.
pub(crate) struct Running<'a> {
    observer: &'a Observer,
    key: Option<u64>,
    /// Notified when the run is terminated (`revoke --terminate`).
    pub(crate) stop: Option<Arc<tokio::sync::Notify>>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.observer.metrics {
            metrics.running(-1);
        }
        if let (Some(control), Some(key)) = (&self.observer.control, self.key) {
            control.leave(key);
        }
    }
}

impl Observer {
    /// Whether events are on (then the pipeline keeps each message's [`Detail`]).
    pub(crate) fn wants_detail(&self) -> bool {
        self.events.is_some()
    }

    /// A message admitted to run was received, then started.
    pub(crate) fn started(&self, task: &str, id: &str, attempt: u32) {
        if let Some(events) = &self.events {
            events.task_event("received", task, id, attempt, None);
            events.task_event("started", task, id, attempt, None);
        }
    }

    /// A message settled for good.
    pub(crate) fn settled(&self, ended: &Ended) {
        if let Some(control) = &self.control {
            control.settled(ended.outcome);
        }
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.settled(ended.task, ended.outcome, ended.ran_for);
        }
        if let (Some(events), Some(detail)) = (&self.events, &ended.detail) {
            events.task_event(
                ended.outcome.as_str(),
                ended.task,
                &detail.id,
                detail.attempt,
                detail.error.as_deref(),
            );
        }
    }

    /// A message was dead-lettered (its dead letter confirmed) for `reason`.
    pub(crate) fn dead_lettered(
        &self,
        queue: &QueueState,
        delivery: &Delivery,
        reason: &'static str,
        error: &str,
    ) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.dead_lettered(task_label(queue, delivery), reason);
        }
        if let Some(events) = &self.events {
            let detail = detail(delivery, Some(error));
            events.task_event(
                "dead_lettered",
                task_label(queue, delivery),
                &detail.id,
                detail.attempt,
                detail.error.as_deref(),
            );
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (queue, reason);
    }

    /// The worker is serving: `online`.
    pub(crate) fn online(&self) {
        if let Some(events) = &self.events {
            events.worker_event("online");
        }
    }

    /// The worker has stopped: `offline`, and the events queued are sent (bounded).
    pub(crate) async fn offline(&self) {
        if let Some(events) = &self.events {
            events.stop().await;
        }
    }

    /// The broker delivered a message again.
    pub(crate) fn redelivered(&self, task: &'static str) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.redelivered(task);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = task;
    }

    /// The worker started consuming on a broker session.
    pub(crate) fn session_started(&self) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.session_started();
        }
    }

    /// A handler starts running; it counts as in flight until the guard is dropped.
    pub(crate) fn running(&self, task: &'static str, id: &str) -> Running<'_> {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.running(1);
        }
        let entered = self.control.as_ref().map(|control| control.enter(task, id));
        let (key, stop) = entered.map_or((None, None), |(key, stop)| (Some(key), Some(stop)));
        Running {
            observer: self,
            key,
            stop,
        }
    }
}

/// The task a delivery is for, as a label: one its queue serves (named by its `task` header, or
/// the queue's only task), or empty. A name taken from the message itself could be anything.
pub(crate) fn task_label(queue: &QueueState, delivery: &Delivery) -> &'static str {
    let named = TaskHeaders::from_table(delivery.properties.headers().as_ref()).task;
    let task = match named.as_deref() {
        Some(name) => queue.tasks.iter().find(|t| t.name() == name),
        None => queue.tasks.first().filter(|_| queue.tasks.len() == 1),
    };
    task.map_or("", |t| t.name())
}

/// A delivery's id and attempt (from its headers), for an event.
pub(crate) fn detail(delivery: &Delivery, error: Option<&str>) -> Detail {
    let headers = TaskHeaders::from_table(delivery.properties.headers().as_ref());
    Detail {
        id: delivery
            .properties
            .message_id()
            .as_ref()
            .map_or_else(String::new, |id| id.as_str().to_owned()),
        attempt: headers.attempt,
        error: error.map(str::to_owned),
    }
}
