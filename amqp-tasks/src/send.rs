//! Sending a task, whatever built the call (a typed stub or a [`DynamicCall`](crate::DynamicCall)):
//! the envelope of properties and headers, the deadline, and the decoding of the reply.

use crate::client::Reply;
use crate::codec::Codec;
use crate::context::Context;
use crate::error::CallError;
use crate::task::{Origin, TaskId};
use crate::wire::{self, ErrorKind, HeaderFields};
use lapin::BasicProperties;
use serde::de::DeserializeOwned;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How much longer than a task may run a call waits by default: the time for a time-limit error
/// to travel back.
pub(crate) const TRANSIT_ALLOWANCE: Duration = Duration::from_secs(1);

/// An outgoing task message, before it is addressed.
pub(crate) struct Outgoing<'a> {
    pub name: &'a str,
    /// The task queue, before the namespace.
    pub queue: &'a str,
    pub signature: Option<&'a str>,
    pub codec: Codec,
    pub body: Vec<u8>,
    pub id: TaskId,
    pub eta: Option<SystemTime>,
    /// The longest a `.call()` may wait.
    pub ceiling: Duration,
    /// What the caller asked for.
    pub timeout: Option<Duration>,
}

/// The default deadline of calls to a task: every attempt may take its whole time limit, and
/// every retry its longest backoff.
pub(crate) fn ceiling(timeout: Duration, retries: u32, backoff: Duration) -> Duration {
    let attempts = timeout.saturating_mul(retries.saturating_add(1));
    let waits = (0..retries.min(32))
        .map(|retry| crate::worker::backoff_ceiling(backoff, retry + 1))
        .fold(Duration::ZERO, Duration::saturating_add);
    attempts
        .saturating_add(waits)
        .saturating_add(TRANSIT_ALLOWANCE)
}

pub(crate) async fn delay(origin: &Origin<'_>, out: Outgoing<'_>) -> Result<TaskId, CallError> {
    let client = origin.client;
    let eta_ms = out.eta.map(unix_ms);
    let properties = envelope(origin, &out, None, eta_ms).with_delivery_mode(2);
    let deadline = Instant::now() + client.confirm_timeout();
    client
        .publish(
            &client.queue_name(out.queue),
            &out.body,
            properties,
            eta_ms,
            deadline,
        )
        .await?;
    tracing::debug!(task = out.name, id = %out.id, "task sent");
    Ok(out.id)
}

/// Many `.delay()`s at once: all published before the first confirm is awaited.
pub(crate) async fn delay_batch(
    origin: &Origin<'_>,
    outs: Vec<Result<Outgoing<'_>, CallError>>,
) -> Vec<Result<TaskId, CallError>> {
    let client = origin.client;
    let mut ids = Vec::with_capacity(outs.len());
    let mut messages = Vec::with_capacity(outs.len());
    for out in outs {
        match out {
            Ok(out) => {
                let eta_ms = out.eta.map(unix_ms);
                let properties = envelope(origin, &out, None, eta_ms).with_delivery_mode(2);
                messages.push(crate::client::Outgoing {
                    queue: client.queue_name(out.queue),
                    body: out.body,
                    properties,
                    eta_ms,
                });
                ids.push(Ok(out.id));
            }
            Err(error) => ids.push(Err(error)),
        }
    }
    let deadline = Instant::now() + client.confirm_timeout();
    let mut confirmed = client.publish_batch(messages, deadline).await.into_iter();
    ids.into_iter()
        .map(|id| {
            let id = id?;
            confirmed
                .next()
                .unwrap_or(Err(CallError::Timeout))
                .map(|()| id)
        })
        .collect()
}

pub(crate) async fn call(origin: &Origin<'_>, out: Outgoing<'_>) -> Result<Reply, CallError> {
    let client = origin.client;
    let mut budget = out.timeout.map_or(out.ceiling, |t| t.min(out.ceiling));
    if let Some(remaining) = origin.parent.and_then(Context::remaining) {
        budget = budget.min(remaining);
    }
    if budget.is_zero() {
        return Err(CallError::Timeout);
    }
    let deadline_ms = unix_ms(SystemTime::now() + budget);
    let eta_ms = out.eta.map(unix_ms);
    if eta_ms.is_some_and(|eta| eta >= deadline_ms) {
        return Err(CallError::Rejected(
            "the eta is past the call's deadline: give the call a longer timeout, or `.delay()` it"
                .to_owned(),
        ));
    }
    let properties = envelope(origin, &out, Some(deadline_ms), eta_ms)
        .with_delivery_mode(1)
        .with_expiration(wire::short(&budget.as_millis().max(1).to_string()));

    // A task waiting on another task is not running: its concurrency slot goes back to the
    // worker, so that relays calling tasks of their own process cannot deadlock it.
    let suspended = origin.parent.map(Context::suspend);
    let reply = client
        .request(
            &client.queue_name(out.queue),
            &out.body,
            properties,
            eta_ms,
            Instant::now() + budget,
        )
        .await;
    if let Some(suspended) = suspended {
        suspended.resume().await;
    }
    if let Ok(reply) = &reply {
        tracing::debug!(task = out.name, id = %out.id, status = reply.kind.as_deref().unwrap_or(""), "reply received");
    }
    reply
}

fn envelope(
    origin: &Origin<'_>,
    out: &Outgoing<'_>,
    deadline_ms: Option<u64>,
    eta_ms: Option<u64>,
) -> BasicProperties {
    // A root task sends no root id (it is its own) and no trace (the worker starts one).
    let parent = origin.parent;
    let traceparent = parent.map(|p| p.trace().child().to_string());
    let headers = HeaderFields {
        task: Some(out.name),
        signature: out.signature,
        attempt: 1,
        deadline_ms,
        eta_ms,
        root_id: parent.map(|p| p.root_id().as_str()),
        parent_id: parent.map(|p| p.task_id().as_str()),
        traceparent: traceparent.as_deref(),
        ..HeaderFields::default()
    };
    BasicProperties::default()
        .with_message_id(wire::short(out.id.as_str()))
        .with_content_type(out.codec.content_type().into())
        .with_type(wire::TYPE_CALL.into())
        .with_headers(headers.to_table())
}

/// Decodes a reply into the task's value or its error.
pub(crate) fn decode_reply<O: DeserializeOwned, E: DeserializeOwned>(
    reply: Reply,
    request_codec: Codec,
) -> Result<O, CallError<E>> {
    decode_reply_with(reply, request_codec, |value: E, _, _| value)
}

/// [`decode_reply`], building the task error from its value, type name and message.
pub(crate) fn decode_reply_with<O: DeserializeOwned, V: DeserializeOwned, E>(
    reply: Reply,
    request_codec: Codec,
    task_error: impl FnOnce(V, String, String) -> E,
) -> Result<O, CallError<E>> {
    let codec = reply
        .content_type
        .as_deref()
        .and_then(Codec::from_content_type)
        .unwrap_or(request_codec);
    match reply.kind.as_deref() {
        Some(wire::TYPE_ERROR) => {
            let error = wire::decode_error::<V>(codec, &reply.body)
                .map_err(|e| CallError::BadReply(format!("error reply: {e}")))?;
            Err(into_call_error(error, task_error))
        }
        _ => codec
            .decode::<O>(&reply.body)
            .map_err(|e| CallError::BadReply(e.to_string())),
    }
}

fn into_call_error<V, E>(
    error: wire::ReceivedError<V>,
    task_error: impl FnOnce(V, String, String) -> E,
) -> CallError<E> {
    let message = error.message;
    match error.kind.as_deref().and_then(ErrorKind::parse) {
        Some(ErrorKind::Task) => match error.value {
            Some(value) => CallError::Task(task_error(value, error.type_name, message)),
            None => CallError::Remote {
                kind: error.type_name,
                message,
            },
        },
        Some(ErrorKind::UnknownTask) => CallError::UnknownTask(message),
        Some(ErrorKind::BadPayload) => CallError::BadPayload(message),
        Some(ErrorKind::SignatureMismatch) => CallError::SignatureMismatch(message),
        Some(ErrorKind::Panicked) => CallError::Panicked(message),
        Some(ErrorKind::TimeLimit) => CallError::TimeLimit(message),
        Some(ErrorKind::Deadline) => CallError::Timeout,
        Some(
            ErrorKind::UnsupportedContentType
            | ErrorKind::TooLarge
            | ErrorKind::TooManyRedeliveries,
        ) => CallError::Rejected(message),
        Some(ErrorKind::BadResult) => CallError::BadReply(message),
        None => CallError::Remote {
            kind: if error.type_name.is_empty() {
                error.kind.unwrap_or_else(|| "error".to_owned())
            } else {
                error.type_name
            },
            message,
        },
    }
}

pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ErrorReply;

    fn reply(codec: Codec, kind: ErrorKind) -> Reply {
        let body = ErrorReply::new(kind, &kind.type_name(), "why".to_owned(), None::<()>);
        Reply {
            kind: Some(wire::TYPE_ERROR.to_owned()),
            content_type: Some(codec.content_type().to_owned()),
            body: codec.encode(&body).unwrap(),
        }
    }

    #[test]
    fn error_replies_of_either_codec_become_their_call_errors() {
        let why = || "why".to_owned();
        let cases: [(ErrorKind, CallError<String>); 11] = [
            (ErrorKind::UnknownTask, CallError::UnknownTask(why())),
            (ErrorKind::BadPayload, CallError::BadPayload(why())),
            (
                ErrorKind::SignatureMismatch,
                CallError::SignatureMismatch(why()),
            ),
            (ErrorKind::Panicked, CallError::Panicked(why())),
            (ErrorKind::TimeLimit, CallError::TimeLimit(why())),
            (ErrorKind::Deadline, CallError::Timeout),
            (
                ErrorKind::UnsupportedContentType,
                CallError::Rejected(why()),
            ),
            (ErrorKind::TooLarge, CallError::Rejected(why())),
            (ErrorKind::TooManyRedeliveries, CallError::Rejected(why())),
            (ErrorKind::BadResult, CallError::BadReply(why())),
            // A task error without its value (another language's service) is remote.
            (
                ErrorKind::Task,
                CallError::Remote {
                    kind: "Task".to_owned(),
                    message: why(),
                },
            ),
        ];
        for codec in [Codec::Bincode, Codec::Json] {
            for (kind, expected) in &cases {
                let decoded = decode_reply::<i64, String>(reply(codec, *kind), codec);
                assert_eq!(decoded.as_ref(), Err(expected), "{codec:?} {kind:?}");
            }
        }
    }

    #[test]
    fn a_typed_task_error_arrives_intact_in_bincode() {
        let body = ErrorReply::new(
            ErrorKind::Task,
            "DivError",
            "division by zero".to_owned(),
            Some("ByZero".to_owned()),
        );
        let reply = Reply {
            kind: Some(wire::TYPE_ERROR.to_owned()),
            content_type: Some(Codec::Bincode.content_type().to_owned()),
            body: Codec::Bincode.encode(&body).unwrap(),
        };
        assert_eq!(
            decode_reply::<i64, String>(reply, Codec::Bincode),
            Err(CallError::Task("ByZero".to_owned()))
        );
    }
}
