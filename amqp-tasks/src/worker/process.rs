//! One delivery: check it, run it, answer it, dead-letter it where due, settle it.

use super::acker::Settle;
use super::{InFlightGuard, QueueState, Shared};
use crate::codec::Codec;
use crate::context::{Context, ContextParts, Slot};
use crate::handler::Outcome;
use crate::registry::Registration;
use crate::task::{TaskId, unix_ms};
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
struct Verdict {
    /// The reply type and body, in `codec`.
    reply: (&'static str, Vec<u8>),
    codec: Codec,
    /// Dead-letter it, with this reason.
    dead_letter: Option<(ErrorKind, String)>,
}

impl Verdict {
    fn failure(codec: Codec, kind: ErrorKind, message: String, dead_letter: bool) -> Verdict {
        let reply = ErrorReply::new(kind, "", message.clone(), None::<()>);
        let body = codec
            .encode(&reply)
            .or_else(|_| Codec::Json.encode(&reply))
            .unwrap_or_default();
        Verdict {
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
        respond(&shared, &queue, &delivery, verdict).await
    };
    tokio::select! {
        settle = work => queue.acks.send(settle),
        // Unsettled: the broker returns the delivery when the channel closes.
        _ = abandon.wait_for(|abandon| *abandon) => {
            tracing::warn!(queue = %queue.name, tag = delivery.delivery_tag, "abandoned at the end of the grace period");
        }
    }
}

async fn judge_and_run(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    permit: OwnedSemaphorePermit,
) -> Verdict {
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
    let deadline = headers.deadline_ms.map(|deadline_ms| {
        let remaining = deadline_ms.saturating_sub(unix_ms(SystemTime::now()));
        Instant::now() + Duration::from_millis(remaining)
    });
    if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
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
        task_name: task.name().to_owned(),
        attempt: headers.attempt,
        redelivered: delivery.redelivered,
        deadline,
        root_id: headers.root_id.map(TaskId::from),
        parent_id: headers.parent_id.map(TaskId::from),
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
    match outcome {
        Outcome::Value(body) => {
            tracing::debug!(
                task = task.name(),
                id,
                trace_id = trace.trace_id(),
                "task succeeded"
            );
            Verdict {
                reply: (wire::TYPE_RESULT, body),
                codec,
                dead_letter: None,
            }
        }
        Outcome::TaskError { body, message } => {
            tracing::info!(task = task.name(), id, trace_id = trace.trace_id(), error = %message, "task returned an error");
            Verdict {
                reply: (wire::TYPE_ERROR, body),
                codec,
                dead_letter: None,
            }
        }
        Outcome::Failure { kind, message } => {
            tracing::warn!(task = task.name(), id, trace_id = trace.trace_id(), reason = kind.as_str(), error = %message, "task failed; dead-lettering it");
            Verdict::failure(codec, kind, message, true)
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
) -> Verdict {
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

/// Answers (on the delivery's own channel, so that the reply is ordered before the ack), then
/// dead-letters where due (waiting for the confirm), and says how to settle the delivery.
async fn respond(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    verdict: Verdict,
) -> Settle {
    let properties = &delivery.properties;
    if let Some(reply_to) = properties.reply_to() {
        let (kind, body) = &verdict.reply;
        let mut reply = BasicProperties::default()
            .with_content_type(verdict.codec.content_type().into())
            .with_type((*kind).into())
            .with_delivery_mode(1);
        if let Some(correlation_id) = properties.correlation_id() {
            reply = reply.with_correlation_id(correlation_id.clone());
        }
        if let Some(message_id) = properties.message_id() {
            reply = reply.with_message_id(message_id.clone());
        }
        let published = queue
            .channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                body,
                reply,
            )
            .await;
        if let Err(error) = published {
            // The channel is gone: so is the unacked delivery, which the broker will redeliver.
            tracing::warn!(%error, "could not publish the reply");
            return Settle::Requeue(delivery.delivery_tag);
        }
    }
    if let Some((kind, message)) = verdict.dead_letter
        && let Err(error) = dead_letter(shared, queue, delivery, kind, &message).await
    {
        tracing::error!(%error, queue = %queue.name, "could not dead-letter a message; returning it to its queue");
        return Settle::Requeue(delivery.delivery_tag);
    }
    Settle::Ack(delivery.delivery_tag)
}

async fn dead_letter(
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
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
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
    let dlq = crate::topology::dead_letter_queue(&queue.name);
    let session = shared.client.session().await?;
    session
        .publish_confirmed(&dlq, &delivery.data, properties)
        .await
}
