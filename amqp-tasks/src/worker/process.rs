//! One delivery: check it, run it (or send it on: not due yet, a retry, a redelivery to count),
//! answer it, dead-letter it where due, settle it.

use super::acker::Settle;
use super::{InFlightGuard, QueueState, Shared};
use crate::codec::Codec;
use crate::context::{Context, ContextParts, Slot};
use crate::handler::Outcome;
use crate::registry::Registration;
use crate::send::unix_ms;
use crate::task::TaskId;
use crate::topology::{DELAY_RESOLUTION, QueueType};
use crate::trace::TraceParent;
use crate::wire::{self, ErrorKind, ErrorReply, TaskHeaders, header};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// What to do with a delivery once it was looked at (and maybe run).
enum Verdict<'a> {
    /// Answer it (where a reply is asked for), dead-letter it if due, ack it.
    Answer {
        /// The reply type and body, in `codec`.
        reply: (&'static str, Vec<u8>),
        codec: Codec,
        dead_letter: Option<(ErrorKind, String)>,
    },
    /// Publish a copy with these headers (through the delay queues if its eta is ahead), then
    /// ack the original.
    Forward {
        headers: TaskHeaders<'a>,
        why: &'static str,
    },
}

impl Verdict<'_> {
    fn failure(codec: Codec, kind: ErrorKind, message: String, dead_letter: bool) -> Self {
        let reply = ErrorReply::new(kind, &kind.type_name(), message.clone(), None::<()>);
        let body = codec
            .encode(&reply)
            .or_else(|_| Codec::Json.encode(&reply))
            .unwrap_or_default();
        Verdict::Answer {
            reply: (wire::TYPE_ERROR, body),
            codec,
            dead_letter: dead_letter.then_some((kind, message)),
        }
    }
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    queue: Arc<QueueState>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
    _in_flight: InFlightGuard,
) {
    let mut abandon = shared.abandon.subscribe();
    let work = async {
        let verdict = judge_and_run(&shared, &queue, &delivery, permit).await;
        carry_out(&shared, &queue, &delivery, verdict).await
    };
    tokio::select! {
        biased;
        settle = work => queue.acks.send(settle),
        // Unsettled: the broker returns the delivery when the channel closes.
        _ = abandon.wait_for(|abandon| *abandon) => {
            tracing::warn!(queue = %queue.name, tag = delivery.delivery_tag, "abandoned at the end of the grace period");
        }
    }
}

async fn judge_and_run<'a>(
    shared: &Shared,
    queue: &QueueState,
    delivery: &'a Delivery,
    permit: OwnedSemaphorePermit,
) -> Verdict<'a> {
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
    if let Some(verdict) = count_redelivery(shared, queue, delivery, &headers, codec, id) {
        return verdict;
    }
    let Some(codec) = codec else {
        let content_type = properties
            .content_type()
            .as_ref()
            .map_or("(none)", |c| c.as_str());
        return refuse(
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
        );
    };
    if delivery.data.len() > shared.settings.max_body {
        return refuse(
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
        );
    }
    let Some(task) = find_task(queue, headers.task.as_deref()) else {
        let served: Vec<&str> = queue.tasks.iter().map(|t| t.name()).collect();
        let message = match &headers.task {
            Some(name) => format!(
                "no task `{name}` is served on queue `{}` (it serves: {})",
                queue.name,
                served.join(", ")
            ),
            None => format!(
                "no `task` header, and queue `{}` serves several tasks: {}",
                queue.name,
                served.join(", ")
            ),
        };
        return refuse(queue, id, task_name, codec, ErrorKind::UnknownTask, message);
    };
    if let Some(fingerprint) = &headers.signature {
        let ours = task.signature();
        if fingerprint != ours.fingerprint() {
            let message = format!(
                "the caller's stub of `{}` has signature {fingerprint}, this worker serves `{}` ({})",
                task.name(),
                ours.text(),
                ours.fingerprint()
            );
            return refuse(
                queue,
                id,
                task.name(),
                codec,
                ErrorKind::SignatureMismatch,
                message,
            );
        }
    }
    let now_ms = unix_ms(SystemTime::now());
    let deadline = headers.deadline_ms.map(|deadline_ms| {
        Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
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
        return Verdict::failure(
            codec,
            ErrorKind::Deadline,
            "the deadline passed before the task could start".into(),
            false,
        );
    }
    if let Some(eta) = headers.eta_ms
        && eta.saturating_sub(now_ms) >= DELAY_RESOLUTION.as_millis() as u64
    {
        return Verdict::Forward {
            headers,
            why: "not due yet",
        };
    }

    let trace = headers
        .traceparent
        .as_deref()
        .and_then(TraceParent::parse)
        .unwrap_or_else(TraceParent::new_root);
    let slot = Arc::new(Slot::new(shared.semaphore.clone(), permit));
    let task_id = TaskId::from(if id.is_empty() {
        TaskId::new().to_string()
    } else {
        id.to_owned()
    });
    let ctx = Context::new(ContextParts {
        client: shared.client.clone(),
        task_id,
        task_name: task.name(),
        attempt: headers.attempt,
        redelivered: delivery.redelivered || headers.redeliveries > 0,
        deadline,
        root_id: headers.root_id.as_deref().map(TaskId::from),
        parent_id: headers.parent_id.as_deref().map(TaskId::from),
        trace: trace.clone(),
        slot: Some(slot.clone()),
    });
    tracing::debug!(
        task = task.name(),
        id,
        trace_id = trace.trace_id(),
        attempt = headers.attempt,
        "task started"
    );
    let outcome = (task.run)(ctx, codec, &delivery.data).await;
    slot.finish();
    let trace_id = trace.trace_id();
    match outcome {
        Outcome::Value(body) => {
            tracing::debug!(task = task.name(), id, trace_id, "task succeeded");
            Verdict::Answer {
                reply: (wire::TYPE_RESULT, body),
                codec,
                dead_letter: None,
            }
        }
        Outcome::TaskError {
            body,
            message,
            retryable,
        } => {
            if retryable && let Some(retry) = next_attempt(task, headers.clone(), &message) {
                tracing::info!(task = task.name(), id, trace_id, attempt = headers.attempt, error = %message, "task failed; retrying");
                return retry;
            }
            tracing::info!(task = task.name(), id, trace_id, error = %message, "task returned an error");
            // A task that asked for retries and used them up is dead-lettered with its history.
            let dead_letter = (task.retries() > 0).then(|| {
                (
                    ErrorKind::Task,
                    format!("failed after {} attempt(s): {message}", headers.attempt),
                )
            });
            Verdict::Answer {
                reply: (wire::TYPE_ERROR, body),
                codec,
                dead_letter,
            }
        }
        Outcome::Failure {
            kind,
            message,
            retryable,
        } => {
            if retryable && let Some(retry) = next_attempt(task, headers.clone(), &message) {
                tracing::warn!(task = task.name(), id, trace_id, reason = kind.as_str(), error = %message, "task failed; retrying");
                return retry;
            }
            tracing::warn!(task = task.name(), id, trace_id, reason = kind.as_str(), error = %message, "task failed; dead-lettering it");
            Verdict::failure(codec, kind, message, true)
        }
    }
}

/// A retry of a failed attempt, if the task has attempts left and its next one can start before
/// the caller's deadline.
fn next_attempt<'a>(
    task: &Registration,
    mut headers: TaskHeaders<'a>,
    error: &str,
) -> Option<Verdict<'a>> {
    let attempt = headers.attempt;
    if attempt > task.retries() {
        return None;
    }
    let delay = retry_delay(task.backoff(), attempt);
    let eta = unix_ms(SystemTime::now() + delay);
    if headers.deadline_ms.is_some_and(|deadline| eta >= deadline) {
        return None;
    }
    headers.errors.push(format!("attempt {attempt}: {error}"));
    headers.attempt = attempt + 1;
    headers.eta_ms = Some(eta);
    Some(Verdict::Forward {
        headers,
        why: "retry",
    })
}

/// The wait before the retry that follows failed attempt `attempt` (1-based): `backoff ×
/// 2^(attempt-1)`, ±20 %.
fn retry_delay(backoff: Duration, attempt: u32) -> Duration {
    jittered(super::backoff_ceiling(backoff, attempt) * 4 / 5)
}

/// `base` × a random factor in [0.8, 1.2].
fn jittered(base: Duration) -> Duration {
    let random = (crate::trace::random_u64() & 0xff) as u32; // 0..=255
    base.mul_f64(0.8 + 0.4 * f64::from(random) / 255.0)
}

/// A message redelivered by the broker may be one that kills its worker: count it, and past
/// the limit dead-letter it instead of running it again.
fn count_redelivery<'a>(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    headers: &TaskHeaders<'a>,
    codec: Option<Codec>,
    id: &str,
) -> Option<Verdict<'a>> {
    let limit = shared.settings.max_redeliveries;
    let (count, counted_by_broker) = match headers.delivery_count {
        // Quorum queues count every return themselves.
        Some(count) => (count, true),
        None if delivery.redelivered && shared.settings.queue_type == QueueType::Classic => {
            (headers.redeliveries + 1, false)
        }
        None => return None,
    };
    if count > limit {
        let message = format!(
            "redelivered {count} times (limit {limit}): it probably kills the worker running it"
        );
        let task = headers.task.as_deref().unwrap_or("");
        return Some(refuse(
            queue,
            id,
            task,
            codec.unwrap_or(Codec::Json),
            ErrorKind::TooManyRedeliveries,
            message,
        ));
    }
    if counted_by_broker {
        return None;
    }
    tracing::info!(queue = %queue.name, id, count, "redelivered message: counting it before running it");
    let mut counted = headers.clone();
    counted.redeliveries = count;
    // The copy waits in the shortest delay queue: by the time it can run (and perhaps kill this
    // process), the original's ack has reached the broker, so the count is not lost.
    let soon = unix_ms(SystemTime::now()) + DELAY_RESOLUTION.as_millis() as u64;
    counted.eta_ms = Some(counted.eta_ms.map_or(soon, |eta| eta.max(soon)));
    Some(Verdict::Forward {
        headers: counted,
        why: "counting a redelivery",
    })
}

fn refuse(
    queue: &QueueState,
    id: &str,
    task: &str,
    codec: Codec,
    kind: ErrorKind,
    message: String,
) -> Verdict<'static> {
    tracing::warn!(queue = %queue.name, task, id, reason = kind.as_str(), error = %message, "message refused; dead-lettering it");
    Verdict::failure(codec, kind, message, true)
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

async fn carry_out(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    verdict: Verdict<'_>,
) -> Settle {
    match verdict {
        Verdict::Answer {
            reply,
            codec,
            dead_letter,
        } => respond(shared, queue, delivery, reply, codec, dead_letter).await,
        // Boxed: rare paths, kept out of the future every delivery allocates.
        Verdict::Forward { headers, why } => {
            Box::pin(forward(shared, queue, delivery, headers, why)).await
        }
    }
}

/// Answers (on the delivery's own channel, so that the reply is ordered before the ack), then
/// dead-letters where due (waiting for the confirm), and says how to settle the delivery.
async fn respond(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    (kind, body): (&'static str, Vec<u8>),
    codec: Codec,
    dead_letter: Option<(ErrorKind, String)>,
) -> Settle {
    let properties = &delivery.properties;
    if let Some(reply_to) = properties.reply_to() {
        // Only what the caller reads: every property costs the broker and both ends.
        let mut reply = BasicProperties::default()
            .with_content_type(codec.content_type().into())
            .with_type(kind.into());
        if let Some(correlation_id) = properties.correlation_id() {
            reply = reply.with_correlation_id(correlation_id.clone());
        }
        // Boxed: lapin's publish future is large, and a fire-and-forget task never needs it.
        let published = Box::pin(queue.channel.basic_publish(
            "".into(),
            reply_to.clone(),
            BasicPublishOptions::default(),
            &body,
            reply,
        ))
        .await;
        if let Err(error) = published {
            // The channel is gone: so is the unacked delivery, which the broker will redeliver.
            tracing::warn!(%error, "could not publish the reply");
            return Settle::Requeue(delivery.delivery_tag);
        }
    }
    if let Some((kind, message)) = dead_letter
        && let Err(error) = Box::pin(dead_letter_it(shared, queue, delivery, kind, &message)).await
    {
        tracing::error!(%error, queue = %queue.name, "could not dead-letter a message; returning it to its queue");
        return Settle::Requeue(delivery.delivery_tag);
    }
    Settle::Ack(delivery.delivery_tag)
}

/// Publishes a copy of the delivery with new headers to its own queue (through the delay queues
/// when its eta is ahead), waits for the confirm, then acks the original.
async fn forward(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    headers: TaskHeaders<'_>,
    why: &'static str,
) -> Settle {
    let original = &delivery.properties;
    let table = headers.write_into(original.headers().clone().unwrap_or_default());
    let mut properties = copy_properties(original).with_headers(table);
    if let Some(deadline) = headers.deadline_ms {
        let left = deadline.saturating_sub(unix_ms(SystemTime::now())).max(1);
        properties = properties.with_expiration(wire::short(&left.to_string()));
    }
    if let Some(mode) = original.delivery_mode() {
        properties = properties.with_delivery_mode(*mode);
    }
    let client = &shared.client;
    let deadline = Instant::now() + client.confirm_timeout();
    match client
        .publish(
            &queue.name,
            &delivery.data,
            properties,
            headers.eta_ms,
            deadline,
        )
        .await
    {
        Ok(()) => {
            tracing::debug!(queue = %queue.name, why, eta = ?headers.eta_ms, "sent on");
            // Acked now rather than batched: the copy is in the queue already, and a crash before
            // the ack would leave two of them.
            // (If the channel is gone, the broker returns the original along with it.)
            let _ = queue
                .channel
                .basic_ack(
                    delivery.delivery_tag,
                    lapin::options::BasicAckOptions::default(),
                )
                .await;
            Settle::AckedAlone(delivery.delivery_tag)
        }
        Err(error) => {
            tracing::warn!(%error, queue = %queue.name, why, "could not send a task on; returning it to its queue");
            Settle::Requeue(delivery.delivery_tag)
        }
    }
}

/// The properties a copy keeps: everything but `expiration`, `delivery_mode` and the headers,
/// which the caller sets.
fn copy_properties(original: &BasicProperties) -> BasicProperties {
    let mut properties = BasicProperties::default();
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = original.kind() {
        properties = properties.with_type(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        properties = properties.with_reply_to(v.clone());
    }
    if let Some(v) = original.priority() {
        properties = properties.with_priority(*v);
    }
    properties
}

async fn dead_letter_it(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    kind: ErrorKind,
    message: &str,
) -> Result<(), crate::CallError> {
    let original = &delivery.properties;
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        header::DEAD_REASON.into(),
        AMQPValue::LongString(kind.as_str().into()),
    );
    headers.insert(
        header::DEAD_ERROR.into(),
        AMQPValue::LongString(message.into()),
    );
    headers.insert(
        header::DEAD_QUEUE.into(),
        AMQPValue::LongString(queue.name.as_str().into()),
    );
    headers.insert(
        header::DEAD_AT.into(),
        AMQPValue::LongLongInt(i64::try_from(unix_ms(SystemTime::now())).unwrap_or(i64::MAX)),
    );
    let properties = copy_properties(original)
        .with_delivery_mode(2)
        .with_headers(headers);
    let dlq = crate::topology::dead_letter_queue(&queue.name);
    let client = &shared.client;
    let deadline = Instant::now() + client.confirm_timeout();
    client
        .publish(&dlq, &delivery.data, properties, None, deadline)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_with_twenty_percent_jitter() {
        let backoff = Duration::from_millis(300);
        for (attempt, base_ms) in [(1, 300.0), (2, 600.0), (3, 1_200.0), (4, 2_400.0)] {
            let delays: Vec<f64> = (0..2_000)
                .map(|_| retry_delay(backoff, attempt).as_secs_f64() * 1_000.0)
                .collect();
            let (min, max) = delays
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
            assert!(
                min >= base_ms * 0.8 - 0.001 && max <= base_ms * 1.2 + 0.001,
                "attempt {attempt}: {min}..{max} ms, expected {base_ms} ms ± 20 %"
            );
            // The jitter spreads the retries over the whole range, not around one value.
            assert!(
                min < base_ms * 0.85 && max > base_ms * 1.15,
                "attempt {attempt}: {min}..{max} ms"
            );
        }
    }
}
