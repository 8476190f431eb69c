//! One delivery, as one pipeline with one name per stage:
//!
//! 1. [`admit`](super::admit): every check before running → [`Admission`] (run it, or a
//!    [`Disposition`] at once);
//! 2. [`execute`](super::execute): the handler under its time limit, panics caught →
//!    [`execute::Outcome`];
//! 3. [`decide`]: what the outcome means for this message (its retries, its dead letter) → a
//!    [`Disposition`];
//! 4. [`dispose`](super::dispose): carry it out (reply, dead-letter, send on) →
//!    [`Settle`](super::settle::Settle);
//! 5. [`settle`](super::settle): the channel's acker acks or requeues it; a message settled for
//!    good has one [`Outcome`] (`succeeded`, `retried`, `failed`, ...), reported once to
//!    [`observe`](super::observe).

use super::admit::{Admission, Admitted, admit};
use super::consume::give_back;
use super::dispose::dispose;
use super::execute::{self, CatchUnwind, panic_message};
use super::observe;
use super::registry::Registration;
use super::settle::Settle;
use super::store;
use super::{InFlightGuard, Lane, QueueState, Shared};
use crate::client::caller::{Gate, Slot};
use crate::context::{Context, ContextParts};
use crate::protocol::codec::Codec;
use crate::protocol::headers::{TaskHeaders, push_error};
use crate::protocol::outcome::Outcome;
use crate::protocol::reply::{ErrorKind, ErrorReply};
use crate::protocol::retry::RetryPolicy;
use crate::protocol::trace::TraceParent;
use crate::protocol::{MAX_DELAY, TYPE_ERROR, TYPE_RESULT, later, unix_ms};
use crate::task::TaskId;
use lapin::message::Delivery;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

/// What to do with a delivery once it was looked at (and maybe run).
pub(crate) enum Disposition<'a> {
    /// Answer it (where a reply is asked for), dead-letter it if due, ack it.
    Answer {
        /// The reply type and body, in `codec`.
        reply: (&'static str, Vec<u8>),
        codec: Codec,
        dead_letter: Option<(ErrorKind, String)>,
    },
    /// Publish a copy with these headers to `target` (through the delay queues if its eta is
    /// ahead), then ack the original.
    Forward {
        headers: TaskHeaders<'a>,
        why: &'static str,
        target: Target,
    },
}

/// Where a copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The queue it came from (the task queue or its redelivered lane).
    Same,
    /// The task queue.
    Main,
    /// The task queue's redelivered lane.
    Redelivered,
}

impl Disposition<'_> {
    /// A framework failure's error reply, dead-lettered or not.
    pub(crate) fn failure(
        codec: Codec,
        kind: ErrorKind,
        message: String,
        dead_letter: bool,
    ) -> Self {
        Disposition::Answer {
            reply: (TYPE_ERROR, ErrorReply::failure_body(codec, kind, &message)),
            codec,
            dead_letter: dead_letter.then_some((kind, message)),
        }
    }
}

/// Runs one delivery through the pipeline, then hands its settlement to the channel's acker.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    queue: Arc<QueueState>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
    _in_flight: InFlightGuard,
) {
    let mut abandon = shared.abandon.subscribe();
    if delivery.redelivered {
        shared
            .observer
            .redelivered(observe::task_label(&queue, &delivery));
    }
    let work = async {
        if let Some((disposition, ended)) = revoked(&shared, &queue, &delivery) {
            drop(permit);
            let results = store::store_for(shared.client.results(), None);
            let stored = results
                .and_then(|_| store::outcome(&delivery, &disposition, None))
                .map(store::revoked);
            let settle = dispose(&shared, &queue, &delivery, disposition).await;
            store_if_settled(results, stored, &settle);
            return (settle, Some(ended));
        }
        let (disposition, ended, ran) = match admit(&shared, &queue, &delivery).await {
            Admission::Run(admitted) => {
                let ran = (admitted.task, admitted.headers.attempt);
                let task = admitted.task.name();
                let started = std::time::Instant::now();
                let (disposition, outcome, detail) =
                    run(&shared, &queue, &delivery, admitted, permit).await;
                // A message refused by the handler's own stage (undecodable arguments) did not
                // run: no run time.
                let ended = Ended {
                    task,
                    outcome,
                    ran_for: (outcome != Outcome::Rejected).then(|| started.elapsed()),
                    detail,
                };
                (disposition, Some(ended), Some(ran))
            }
            Admission::Dispose(disposition) => {
                // Nothing runs: the slot is free before the disposition is carried out.
                drop(permit);
                let refused = refused(&shared, &queue, &delivery, &disposition);
                (disposition, refused, None)
            }
        };
        let results = store::store_for(shared.client.results(), ran.map(|(task, _)| task));
        let mut stored = results.and_then(|_| store::outcome(&delivery, &disposition, ran));
        if ended
            .as_ref()
            .is_some_and(|ended| ended.outcome == Outcome::Revoked)
        {
            // `revoke --terminate` cancelled it while it ran.
            stored = stored.map(store::revoked);
        }
        let settle = dispose(&shared, &queue, &delivery, disposition).await;
        store_if_settled(results, stored, &settle);
        (settle, ended)
    };
    // Anything of the pipeline that panics (a bug, not the user's code, which execute guards)
    // still settles the delivery, so that the ack window keeps moving.
    let work = CatchUnwind::new(work);
    tokio::select! {
        biased;
        settle = work => match settle {
            Ok((settle, ended)) => {
                // Counted once, and only when the message is settled for good (not given back
                // to run again).
                if let (Settle::Ack(_) | Settle::AckedAlone(_), Some(ended)) = (settle, ended) {
                    shared.observer.settled(&ended);
                }
                queue.acks.send(settle)
            }
            Err(panic) => {
                tracing::error!(queue = %queue.name, tag = delivery.delivery_tag, panic = %panic_message(&*panic), "the worker's pipeline panicked; returning the delivery");
                queue.acks.send(Settle::Requeue(delivery.delivery_tag));
            }
        },
        // The grace period ran out: the handler stops here, and its delivery is given back
        // (uncounted: the worker is not dying, it was asked to stop).
        () = async { let _ = abandon.wait_for(|abandon| *abandon).await; } => {
            tracing::warn!(queue = %queue.name, tag = delivery.delivery_tag, "abandoned at the end of the grace period; given back");
            give_back(&shared, &queue, &[&delivery]).await;
        }
    }
}

/// Writes a message's state to the result store once its settlement is carried out: a delivery
/// given back runs again, and says so then.
fn store_if_settled(
    results: Option<&crate::results::Results>,
    stored: Option<crate::results::Write>,
    settle: &Settle,
) {
    if let (Some(results), Some(write)) = (results, stored)
        && matches!(settle, Settle::Ack(_) | Settle::AckedAlone(_))
    {
        results.write(write);
    }
}

/// How a message ended in this worker, once settled: its task and [`Outcome`], how long its
/// handler ran (`None` when it was refused before running), and, with events on, its id,
/// attempt and error.
pub(crate) struct Ended {
    pub(crate) task: &'static str,
    pub(crate) outcome: Outcome,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) ran_for: Option<std::time::Duration>,
    pub(crate) detail: Option<observe::Detail>,
}

/// The outcome of a message refused at admission (answered without running): `rejected`. A copy
/// sent on (redelivered, passed on, not due yet) has not ended: no outcome.
fn refused(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    disposition: &Disposition<'_>,
) -> Option<Ended> {
    let Disposition::Answer { dead_letter, .. } = disposition else {
        return None;
    };
    let detail = shared.observer.wants_detail().then(|| {
        let error = dead_letter.as_ref().map(|(_, message)| message.as_str());
        observe::detail(delivery, error)
    });
    Some(Ended {
        task: observe::task_label(queue, delivery),
        outcome: Outcome::Rejected,
        ran_for: None,
        detail,
    })
}

/// A delivery whose task id was revoked (`amqp-tasks revoke`): not run, answered with
/// `revoked`, not dead-lettered.
fn revoked<'a>(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
) -> Option<(Disposition<'a>, Ended)> {
    let id = delivery.properties.message_id().as_ref()?.as_str();
    if !shared.revocations.contains(id) {
        return None;
    }
    let task = observe::task_label(queue, delivery);
    tracing::info!(task, id, "revoked: not run");
    let codec = delivery
        .properties
        .content_type()
        .as_ref()
        .and_then(|c| Codec::from_content_type(c.as_str()))
        .unwrap_or(Codec::Json);
    let message = "revoked before it ran".to_owned();
    let detail = shared
        .observer
        .wants_detail()
        .then(|| observe::detail(delivery, Some(&message)));
    let ended = Ended {
        task,
        outcome: Outcome::Revoked,
        ran_for: None,
        detail,
    };
    Some((
        Disposition::failure(codec, ErrorKind::Revoked, message, false),
        ended,
    ))
}

/// The `task` span of one run (the worker binary's log formats its fields cheaply: see
/// `log_fields`).
fn task_span(
    name: &str,
    id: &str,
    headers: &TaskHeaders<'_>,
    trace_id: Option<&str>,
) -> tracing::Span {
    tracing::info_span!(
        "task",
        name,
        id,
        attempt = headers.attempt,
        trace_id,
        parent_id = headers.parent_id.as_deref(),
    )
}

/// Executes an admitted delivery with its context, then decides what its outcome means. A task of
/// the redelivered lane runs alone: it waits for every other task of the worker to finish, and
/// none starts until it has.
async fn run<'a>(
    shared: &Shared,
    queue: &QueueState,
    delivery: &'a Delivery,
    admitted: Admitted<'a>,
    permit: OwnedSemaphorePermit,
) -> (Disposition<'a>, Outcome, Option<observe::Detail>) {
    let Admitted {
        task,
        codec,
        headers,
        id,
        deadline,
    } = admitted;
    let gate = Gate::new(shared.gate.clone(), queue.lane == Lane::Redelivered);
    let guard = gate.enter().await;
    let incoming = headers.traceparent.as_deref().and_then(TraceParent::parse);
    // One span per run, across hops: the trace id and the parent task tie it to its caller's.
    // Without OpenTelemetry a task without a caller's trace starts its own here, so that the span
    // is made with every field at once (a field recorded later is formatted again by `fmt`).
    #[cfg(not(feature = "opentelemetry"))]
    let (span, trace) = {
        let trace = incoming.unwrap_or_else(TraceParent::new_root);
        let span = task_span(task.name(), id, &headers, Some(trace.trace_id()));
        (span, trace)
    };
    // With OpenTelemetry, the span joins the caller's trace, and its context is what the task's
    // own calls continue; without a caller's trace, its trace id is known once the span is.
    #[cfg(feature = "opentelemetry")]
    let (span, trace) = {
        let span = task_span(
            task.name(),
            id,
            &headers,
            incoming.as_ref().map(TraceParent::trace_id),
        );
        let started_trace = incoming.is_none();
        let joined = crate::otel::join(&span, incoming.as_ref());
        let trace = joined.or(incoming).unwrap_or_else(TraceParent::new_root);
        if started_trace {
            span.record("trace_id", trace.trace_id());
        }
        (span, trace)
    };
    let slot = Arc::new(Slot::new(
        shared.semaphore.clone(),
        permit,
        Some((gate, guard)),
    ));
    let task_id = TaskId::from(if id.is_empty() {
        TaskId::new().to_string()
    } else {
        id.to_owned()
    });
    let results = store::store_for(shared.client.results(), Some(task));
    if let Some(results) = results {
        store::started(results, task, id, headers.attempt);
    }
    let ctx = Context::new(ContextParts {
        results: results.cloned(),
        client: shared.client.clone(),
        states: shared.states.clone(),
        task_id,
        task_name: task.name(),
        attempt: headers.attempt,
        // Everything in the redelivered lane came back from a worker that went away.
        redelivered: delivery.redelivered
            || queue.lane == Lane::Redelivered
            || headers.redeliveries > 0,
        deadline,
        root_id: headers.root_id.as_deref().map(TaskId::from),
        parent_id: headers.parent_id.as_deref().map(TaskId::from),
        trace: trace.clone(),
        slot: Some(slot.clone()),
    });
    tracing::debug!(parent: &span, "task started");
    shared.observer.started(task.name(), id, headers.attempt);
    let running = shared.observer.running(task.name(), id);
    let handler = (task.run)(ctx, codec, &delivery.data).instrument(span.clone());
    let ran = match running.stop.clone() {
        Some(stop) => tokio::select! {
            biased;
            ran = handler => Some(ran),
            () = stop.notified() => None,
        },
        None => Some(handler.await),
    };
    drop(running);
    slot.finish();
    let Some(ran) = ran else {
        // Revoked with --terminate while it ran: cancelled, answered, not dead-lettered.
        let message = "revoked: cancelled while running".to_owned();
        span.in_scope(|| tracing::info!("task revoked while running: cancelled"));
        let detail = shared.observer.wants_detail().then(|| observe::Detail {
            id: id.to_owned(),
            attempt: headers.attempt,
            error: Some(message.clone()),
        });
        let disposition = Disposition::failure(codec, ErrorKind::Revoked, message, false);
        return (disposition, Outcome::Revoked, detail);
    };
    let ended = match &ran {
        execute::Outcome::Value(_) => Outcome::Succeeded,
        execute::Outcome::TaskError { .. } => Outcome::Failed,
        execute::Outcome::Failure { kind, .. } => Outcome::of_failure(*kind),
    };
    let detail = shared.observer.wants_detail().then(|| observe::Detail {
        id: id.to_owned(),
        attempt: headers.attempt,
        error: match &ran {
            execute::Outcome::Value(_) => None,
            execute::Outcome::TaskError { message, .. }
            | execute::Outcome::Failure { message, .. } => Some(message.clone()),
        },
    });
    span.in_scope(|| {
        let disposition = decide(task, codec, headers, id, trace.trace_id(), ran);
        // A copy sent on is a retry.
        let outcome = match disposition {
            Disposition::Forward { .. } => Outcome::Retried,
            Disposition::Answer { .. } => ended,
        };
        tracing::debug!(outcome = outcome.as_str(), "task ended");
        (disposition, outcome, detail)
    })
}

/// What an outcome means for its message: answered (and dead-lettered where due), or retried.
/// (The test worker decides with it too.)
pub(crate) fn decide<'a>(
    task: &Registration,
    codec: Codec,
    headers: TaskHeaders<'a>,
    id: &str,
    trace_id: &str,
    outcome: execute::Outcome,
) -> Disposition<'a> {
    match outcome {
        execute::Outcome::Value(body) => {
            tracing::debug!(task = task.name(), id, trace_id, "task succeeded");
            Disposition::Answer {
                reply: (TYPE_RESULT, body),
                codec,
                dead_letter: None,
            }
        }
        execute::Outcome::TaskError {
            body,
            message,
            retryable,
        } => {
            let attempt = headers.attempt;
            if retryable && let Some(retry) = next_attempt(task, headers.clone(), &message) {
                tracing::info!(task = task.name(), id, trace_id, attempt, error = %message, "task failed; retrying");
                return retry;
            }
            tracing::info!(task = task.name(), id, trace_id, error = %message, "task returned an error");
            // A task that asked for retries and used them up is dead-lettered with its history.
            let dead_letter = (task.retries() > 0).then(|| {
                (
                    ErrorKind::Task,
                    format!("failed after {attempt} attempt(s): {message}"),
                )
            });
            Disposition::Answer {
                reply: (TYPE_ERROR, body),
                codec,
                dead_letter,
            }
        }
        execute::Outcome::Failure {
            kind,
            message,
            retryable,
        } => {
            if retryable && let Some(retry) = next_attempt(task, headers, &message) {
                tracing::warn!(task = task.name(), id, trace_id, reason = kind.as_str(), error = %message, "task failed; retrying");
                return retry;
            }
            tracing::warn!(task = task.name(), id, trace_id, reason = kind.as_str(), error = %message, "task failed; dead-lettering it");
            Disposition::failure(codec, kind, message, true)
        }
    }
}

/// A retry of a failed attempt, if the task has attempts left and its next one can start before
/// the caller's deadline.
fn next_attempt<'a>(
    task: &Registration,
    mut headers: TaskHeaders<'a>,
    error: &str,
) -> Option<Disposition<'a>> {
    let attempt = headers.attempt;
    if attempt > task.retries() {
        return None;
    }
    let delay = RetryPolicy::task(task.backoff()).delay(attempt);
    let eta = unix_ms(later(SystemTime::now(), delay, MAX_DELAY));
    if headers.deadline_ms.is_some_and(|deadline| eta >= deadline) {
        return None;
    }
    push_error(&mut headers.errors, &format!("attempt {attempt}: {error}"));
    headers.attempt = attempt.saturating_add(1);
    headers.eta_ms = Some(eta);
    // A task that ran and failed did not kill its worker: its retry runs in the task queue.
    Some(Disposition::Forward {
        headers,
        why: "retry",
        target: Target::Main,
    })
}
