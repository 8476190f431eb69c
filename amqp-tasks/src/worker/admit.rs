//! Admit: the first stage of a delivery, every check made before a handler may run. A message
//! with headers too large to copy, redelivered (sent to the redelivered lane, counted there, and
//! dead-lettered past the limit), in an unknown codec, too large, for a task not served here
//! (passed on if another worker serves it), from a stub with another signature, past its deadline
//! or not due yet is turned into a [`Disposition`] (answered and dead-lettered, answered only, or
//! sent on) without running anything; the rest is [`Admitted`], with the task and what its
//! [`Context`](crate::Context) needs.
//!
//! Poison messages: a message that kills its worker comes back redelivered, and so do the ones
//! that were merely prefetched with it. A redelivered message is never run in the task queue:
//! it is moved to the queue's redelivered lane, whose consumer takes one message at a time and
//! runs it alone (no other task of the worker runs meanwhile). Only a message that comes back
//! redelivered from that lane was running alone when its worker went away: only it is counted
//! (`redeliveries`), and dead-lettered once the count reaches `--max-redeliveries`. A graceful
//! stop gives unfinished deliveries back uncounted.

use super::delivery::{Disposition, Target};
use super::registry::Registration;
use super::{Lane, QueueState, Shared};
use crate::protocol::codec::Codec;
use crate::protocol::headers::{TaskHeaders, table_len};
use crate::protocol::reply::ErrorKind;
use crate::protocol::topology::DELAY_RESOLUTION;
use crate::protocol::{MAX_DELAY, unix_ms};
use lapin::message::Delivery;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A delivery that may run.
pub(crate) struct Admitted<'a> {
    pub(crate) task: &'static Registration,
    pub(crate) codec: Codec,
    pub(crate) headers: TaskHeaders<'a>,
    /// The task id (`message_id`; empty when the sender gave none).
    pub(crate) id: &'a str,
    pub(crate) deadline: Option<Instant>,
}

/// What the admission stage decided.
pub(crate) enum Admission<'a> {
    Run(Admitted<'a>),
    Dispose(Disposition<'a>),
}

/// How often workers that do not serve a task may pass it on before it is dead-lettered.
const MAX_PASSED_ON: u32 = 20;
/// How long a message passed on waits (in the delay queues) before a worker sees it again.
const PASS_ON_DELAY_MS: u64 = 200;

pub(crate) async fn admit<'a>(
    shared: &Shared,
    queue: &QueueState,
    delivery: &'a Delivery,
) -> Admission<'a> {
    let properties = &delivery.properties;
    let headers = TaskHeaders::from_table(properties.headers().as_ref());
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .unwrap_or("");
    let task_name = headers.task.as_deref().unwrap_or("");

    let codec = properties
        .content_type()
        .as_ref()
        .and_then(|c| Codec::from_content_type(c.as_str()));
    // Headers too large to be copied with the framework's own (a retry, a dead letter) within one
    // frame: refused before anything else, and the dead letter keeps what fits.
    let header_bytes = properties.headers().as_ref().map_or(0, table_len);
    if header_bytes > queue.budget.receive {
        return Admission::Dispose(refuse(
            queue,
            id,
            task_name,
            codec.unwrap_or(Codec::Json),
            ErrorKind::TooLarge,
            format!(
                "the headers are {header_bytes} bytes; this worker accepts at most {}",
                queue.budget.receive
            ),
        ));
    }
    if delivery.redelivered {
        return Admission::Dispose(redelivered(shared, queue, headers, codec, id));
    }
    let Some(codec) = codec else {
        let content_type = properties
            .content_type()
            .as_ref()
            .map_or("(none)", |c| c.as_str());
        return Admission::Dispose(refuse(
            queue,
            id,
            task_name,
            Codec::Json,
            ErrorKind::UnsupportedContentType,
            format!(
                "content type `{content_type}` is not supported: send `{}` or `{}`",
                Codec::Bincode.content_type(),
                Codec::Json.content_type()
            ),
        ));
    };
    if let Some(header) = headers.malformed {
        return Admission::Dispose(refuse(
            queue,
            id,
            "",
            codec,
            ErrorKind::BadPayload,
            format!("the `{header}` header must be a string"),
        ));
    }
    if delivery.data.len() > shared.settings.max_body {
        return Admission::Dispose(refuse(
            queue,
            id,
            task_name,
            codec,
            ErrorKind::TooLarge,
            format!(
                "the body is {} bytes; this worker accepts at most {}",
                delivery.data.len(),
                shared.settings.max_body
            ),
        ));
    }
    let Some(task) = find_task(queue, headers.task.as_deref()) else {
        // Another worker of this queue may serve it (a worker serving part of a shared queue, a
        // rolling deploy): then it is passed on, a bounded number of times.
        if let Some(name) = headers.task.as_deref()
            && headers.passed_on < MAX_PASSED_ON
            && shared.presence.served(&shared.client, name).await
        {
            let mut passed = headers.clone();
            passed.passed_on = headers.passed_on + 1;
            passed.eta_ms = Some(unix_ms(SystemTime::now()) + PASS_ON_DELAY_MS);
            tracing::debug!(queue = %queue.name, task = name, id, "not served here but by another worker: passed on");
            return Admission::Dispose(Disposition::Forward {
                headers: passed,
                why: "served by another worker",
                target: Target::Main,
            });
        }
        let served: Vec<&str> = queue.tasks.iter().map(|t| t.name()).collect();
        let passed = match headers.passed_on {
            0 => String::new(),
            n => format!("; passed on {n} times by workers that do not serve it"),
        };
        let message = match &headers.task {
            Some(name) => format!(
                "no task `{name}` is served on queue `{}` (it serves: {}){passed}",
                queue.main,
                served.join(", ")
            ),
            None => format!(
                "no `task` header, and queue `{}` serves several tasks: {}",
                queue.main,
                served.join(", ")
            ),
        };
        return Admission::Dispose(refuse(
            queue,
            id,
            task_name,
            codec,
            ErrorKind::UnknownTask,
            message,
        ));
    };
    if let Some(message) = headers
        .signature
        .as_deref()
        .and_then(|fingerprint| task.refuses_signature(fingerprint))
    {
        return Admission::Dispose(refuse(
            queue,
            id,
            task.name(),
            codec,
            ErrorKind::SignatureMismatch,
            message,
        ));
    }
    let now_ms = unix_ms(SystemTime::now());
    // A forged deadline far ahead is as good as none: clamped, never an overflow.
    let deadline = headers.deadline_ms.map(|deadline_ms| {
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms)).min(MAX_DELAY);
        Instant::now() + left
    });
    if headers
        .deadline_ms
        .is_some_and(|deadline| deadline <= now_ms)
    {
        tracing::info!(
            task = task.name(),
            id,
            "deadline passed before the task could start; not run"
        );
        return Admission::Dispose(Disposition::failure(
            codec,
            ErrorKind::Deadline,
            "the deadline passed before the task could start".into(),
            false,
        ));
    }
    if let Some(eta) = headers.eta_ms
        && eta.saturating_sub(now_ms) >= DELAY_RESOLUTION.as_millis() as u64
    {
        return Admission::Dispose(Disposition::Forward {
            headers,
            why: "not due yet",
            target: Target::Same,
        });
    }
    Admission::Run(Admitted {
        task,
        codec,
        headers,
        id,
        deadline,
    })
}

/// A message the broker redelivered. From the task queue: moved to the redelivered lane,
/// uncounted (it may merely have been prefetched by a worker that died). From the lane: it was the
/// one running alone when its worker went away, so it is counted, and dead-lettered once the count
/// reaches the limit.
fn redelivered<'a>(
    shared: &Shared,
    queue: &QueueState,
    mut headers: TaskHeaders<'a>,
    codec: Option<Codec>,
    id: &str,
) -> Disposition<'a> {
    // The copy waits in the delay queues (at least 200 ms: what remains of 300 ms is routed to
    // the 200 ms bucket, never straight to the lane): by the time it can run (and perhaps kill
    // this process), the original's ack has reached the broker, so no second copy comes back.
    let soon = unix_ms(SystemTime::now()) + 3 * DELAY_RESOLUTION.as_millis() as u64;
    headers.eta_ms = Some(headers.eta_ms.map_or(soon, |eta| eta.max(soon)));
    match queue.lane {
        Lane::Main => {
            tracing::info!(queue = %queue.name, id, "redelivered: moved to the redelivered lane, to run alone");
            Disposition::Forward {
                headers,
                why: "redelivered: to run alone",
                target: Target::Redelivered,
            }
        }
        Lane::Redelivered => {
            let limit = shared.settings.max_redeliveries;
            let count = headers.redeliveries.saturating_add(1);
            if count >= limit {
                let message = format!(
                    "its worker went away while it ran alone {count} times (limit {limit}): it \
                     probably kills the worker running it"
                );
                let task = headers.task.as_deref().unwrap_or("");
                return refuse(
                    queue,
                    id,
                    task,
                    codec.unwrap_or(Codec::Json),
                    ErrorKind::TooManyRedeliveries,
                    message,
                );
            }
            tracing::info!(queue = %queue.name, id, count, "its worker went away while it ran alone: counted");
            headers.redeliveries = count;
            Disposition::Forward {
                headers,
                why: "counting a redelivery",
                target: Target::Same,
            }
        }
    }
}

fn refuse(
    queue: &QueueState,
    id: &str,
    task: &str,
    codec: Codec,
    kind: ErrorKind,
    message: String,
) -> Disposition<'static> {
    tracing::warn!(queue = %queue.name, task, id, reason = kind.as_str(), error = %message, "message refused; dead-lettering it");
    Disposition::failure(codec, kind, message, true)
}

fn find_task(queue: &QueueState, name: Option<&str>) -> Option<&'static Registration> {
    match name {
        Some(name) => queue.tasks.iter().copied().find(|t| t.name() == name),
        // A sender without the header (aio-pika) names the task by its queue.
        None => match queue.tasks.as_slice() {
            [only] => Some(*only),
            _ => None,
        },
    }
}
