//! The worker's writes to its client's result store: `Started` before a handler runs, and once a
//! delivery is disposed of, what its disposition means (`Succeeded`, `Failed`, `Retrying`,
//! `DeadLettered`) with the reply a caller would have received. Only queued here: the store's
//! writer batches them in the background, so a store that is slow or down never holds a task up.

use super::delivery::Disposition;
use super::registry::Registration;
use crate::protocol::TYPE_RESULT;
use crate::protocol::headers::TaskHeaders;
use crate::protocol::reply::ErrorKind;
use crate::results::{Results, StoredReply, TaskState, Write};
use lapin::message::Delivery;
use std::time::SystemTime;

/// The store a task's states go to: none without one, or for a task with `store_result = false`.
pub(crate) fn store_for<'a>(
    results: Option<&'a Results>,
    task: Option<&Registration>,
) -> Option<&'a Results> {
    results.filter(|_| task.is_none_or(Registration::store_result))
}

/// `Started`, for the attempt about to run.
pub(crate) fn started(results: &Results, task: &Registration, id: &str, attempt: u32) {
    if id.is_empty() {
        return;
    }
    results.write(Write::State {
        id: id.to_owned(),
        task: task.name().to_owned(),
        signature: Some(task.fingerprint().to_owned()),
        state: TaskState::Started,
        attempt,
        message: None,
        reply: None,
        at: SystemTime::now(),
    });
}

/// The same write, as `Revoked`: the task was revoked before it ran, or terminated while it ran
/// (`amqp-tasks revoke [--terminate]`).
pub(crate) fn revoked(mut write: Write) -> Write {
    if let Write::State { state, .. } = &mut write {
        *state = TaskState::Revoked;
    }
    write
}

/// What a disposition means for the store, if anything: `ran` is the task that ran (none when the
/// delivery was refused before running). Taken before the disposition is carried out (which
/// consumes it), written after.
pub(crate) fn outcome(
    delivery: &Delivery,
    disposition: &Disposition<'_>,
    ran: Option<(&Registration, u32)>,
) -> Option<Write> {
    let id = delivery.properties.message_id().as_ref()?.as_str();
    if id.is_empty() {
        return None;
    }
    let (task, signature, attempt) = match ran {
        Some((task, attempt)) => (
            task.name().to_owned(),
            Some(task.fingerprint().to_owned()),
            attempt,
        ),
        None => {
            let headers = TaskHeaders::from_table(delivery.properties.headers().as_ref());
            let name = headers.task.as_deref().unwrap_or_default().to_owned();
            (name, None, headers.attempt)
        }
    };
    let at = SystemTime::now();
    match disposition {
        Disposition::Answer {
            reply: (kind, body),
            codec,
            dead_letter,
        } => {
            // Arguments that do not decode are found as the handler starts: refused, not run.
            let refused = dead_letter.as_ref().is_some_and(|(kind, _)| {
                !matches!(
                    kind,
                    ErrorKind::Task
                        | ErrorKind::Panicked
                        | ErrorKind::TimeLimit
                        | ErrorKind::BadResult
                )
            });
            let state = match (ran.is_some() && !refused, *kind == TYPE_RESULT) {
                (true, true) => TaskState::Succeeded,
                (true, false) => TaskState::Failed,
                (false, _) => TaskState::DeadLettered,
            };
            Some(Write::State {
                id: id.to_owned(),
                task,
                signature,
                state,
                attempt,
                message: dead_letter.as_ref().map(|(_, message)| message.clone()),
                reply: Some(StoredReply {
                    kind: (*kind).to_owned(),
                    content_type: codec.content_type().to_owned(),
                    body: body.clone(),
                }),
                at,
            })
        }
        Disposition::Forward { why, headers, .. } if ran.is_some() && *why == "retry" => {
            Some(Write::State {
                id: id.to_owned(),
                task,
                signature,
                state: TaskState::Retrying,
                attempt,
                message: headers.errors.last().cloned(),
                reply: None,
                at,
            })
        }
        // Sent on without running (not due yet, a redelivery counted): nothing new to say.
        Disposition::Forward { .. } => None,
    }
}
