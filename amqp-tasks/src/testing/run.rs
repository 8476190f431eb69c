//! One message through the test worker: the checks a worker makes before running (codec, task,
//! state, signature, deadline), the run itself ([`execute`](crate::worker::execute), as on a
//! worker), and the worker's own decision of what the outcome means
//! ([`decide`](crate::worker::delivery::decide)): answered (and recorded as dead-lettered where a
//! worker would), or sent again later (a retry).
//!
//! Times: the wire carries Unix milliseconds; the test worker turns them into tokio instants
//! when a message arrives, so that its waits and deadlines follow tokio's clock (paused or not)
//! rather than the wall clock.

use super::{DeadLetter, Inner};
use crate::context::{Context, ContextParts};
use crate::protocol::codec::Codec;
use crate::protocol::headers::TaskHeaders;
use crate::protocol::properties::copy_properties;
use crate::protocol::reply::{ErrorKind, Reply};
use crate::protocol::trace::TraceParent;
use crate::protocol::unix_ms;
use crate::state::States;
use crate::task::TaskId;
use crate::worker::delivery::{Disposition, decide};
use crate::worker::registry::Registration;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A message held by the test worker.
pub(crate) struct Queued {
    pub(crate) queue: String,
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    /// When it may run (its eta, in tokio time).
    pub(crate) due: Instant,
    /// When its caller stops waiting (its `deadline` header, in tokio time).
    pub(crate) deadline: Option<Instant>,
    /// Order of arrival, among messages due at the same time.
    pub(crate) seq: u64,
}

impl Queued {
    pub(crate) fn new(message: crate::client::local::LocalMessage) -> Queued {
        let headers = TaskHeaders::from_table(message.properties.headers().as_ref());
        let deadline = headers.deadline_ms.map(in_tokio_time);
        let due = message
            .eta_ms
            .or(headers.eta_ms)
            .map_or_else(Instant::now, in_tokio_time);
        Queued {
            queue: message.queue,
            body: message.body,
            properties: message.properties,
            due,
            deadline,
            seq: 0,
        }
    }
}

/// Ordered by when it is due, then by arrival.
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Queued {}

/// A Unix time in milliseconds, as a tokio instant (now, if it has passed).
fn in_tokio_time(unix: u64) -> Instant {
    let ahead = unix.saturating_sub(unix_ms(SystemTime::now()));
    Instant::now() + Duration::from_millis(ahead).min(crate::protocol::MAX_DELAY)
}

/// What became of a message.
pub(crate) enum Step {
    /// Answered: the reply a caller would read.
    Answered(Reply),
    /// To run again when due (a retry).
    Again(Box<Queued>),
}

/// Waits until `due`, without a trip through tokio's timer (a millisecond tick) when it has come.
pub(crate) async fn wait_until(due: Instant) {
    if due > Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}

/// A step and the handler runs it took.
pub(crate) struct Ran {
    pub(crate) step: Step,
    pub(crate) runs: usize,
}

/// A request, carried through every retry until it is answered.
pub(crate) async fn serve_request(inner: Arc<Inner>, mut queued: Queued) -> Reply {
    loop {
        wait_until(queued.due).await;
        match step(&inner, queued).await.step {
            Step::Answered(reply) => return reply,
            Step::Again(next) => queued = *next,
        }
    }
}

/// Checks, runs and decides one message.
pub(crate) async fn step(inner: &Arc<Inner>, queued: Queued) -> Ran {
    let properties = &queued.properties;
    let headers = TaskHeaders::from_table(properties.headers().as_ref());
    let id = properties
        .message_id()
        .as_ref()
        .map_or("", |id| id.as_str())
        .to_owned();
    let task_name = headers.task.as_deref().unwrap_or("").to_owned();
    let codec = properties
        .content_type()
        .as_ref()
        .and_then(|c| Codec::from_content_type(c.as_str()));
    let admitted = admit(inner, &queued, &headers, codec);
    let (task, codec, states) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            drop(headers);
            return Ran {
                step: conclude(inner, queued, &task_name, &id, refusal),
                runs: 0,
            };
        }
    };

    let trace = headers
        .traceparent
        .as_deref()
        .and_then(TraceParent::parse)
        .unwrap_or_else(TraceParent::new_root);
    let task_id = TaskId::from(if id.is_empty() {
        TaskId::new().to_string()
    } else {
        id.clone()
    });
    let ctx = Context::new(ContextParts {
        client: inner.client.clone(),
        states,
        task_id,
        task_name: task.name(),
        attempt: headers.attempt,
        redelivered: false,
        deadline: queued.deadline,
        root_id: headers.root_id.as_deref().map(TaskId::from),
        parent_id: headers.parent_id.as_deref().map(TaskId::from),
        trace: trace.clone(),
        slot: None,
        results: None,
    });
    let outcome = (task.run)(ctx, codec, &queued.body).await;
    inner.runs.fetch_add(1, Ordering::Relaxed);
    let decided = decide(&task, codec, headers, &id, trace.trace_id(), outcome);
    let decided = own(decided, &queued.properties);
    Ran {
        step: conclude(inner, queued, &task_name, &id, decided),
        runs: 1,
    }
}

/// The checks a worker makes before it runs a message, in its order; a refusal is the
/// disposition a worker would carry out.
fn admit(
    inner: &Inner,
    queued: &Queued,
    headers: &TaskHeaders<'_>,
    codec: Option<Codec>,
) -> Result<(Arc<Registration>, Codec, Arc<States>), Decided> {
    let refuse =
        |codec, kind, message| Decided::answer(Disposition::failure(codec, kind, message, true));
    let Some(codec) = codec else {
        let message = "the content type is not a supported codec".to_owned();
        return Err(refuse(
            Codec::Json,
            ErrorKind::UnsupportedContentType,
            message,
        ));
    };
    if let Some(header) = headers.malformed {
        let message = format!("the `{header}` header must be a string");
        return Err(refuse(codec, ErrorKind::BadPayload, message));
    }
    let task = inner
        .find(&queued.queue, headers.task.as_deref())
        .map_err(|message| refuse(codec, ErrorKind::UnknownTask, message))?;
    let states = inner.states();
    if let Some(missing) = states.missing(task.states()) {
        let message = format!(
            "task \"{}\" needs State<{}>: add it with TestWorker::state",
            task.name(),
            missing.name
        );
        return Err(refuse(codec, ErrorKind::UnknownTask, message));
    }
    if let Some(message) = headers
        .signature
        .as_deref()
        .and_then(|fingerprint| task.refuses_signature(fingerprint))
    {
        return Err(refuse(codec, ErrorKind::SignatureMismatch, message));
    }
    if queued
        .deadline
        .is_some_and(|deadline| deadline <= Instant::now())
    {
        return Err(Decided::answer(Disposition::failure(
            codec,
            ErrorKind::Deadline,
            "the deadline passed before the task could start".into(),
            false,
        )));
    }
    Ok((task, codec, states))
}

/// A disposition that no longer borrows the message's headers.
enum Decided {
    Answer {
        reply: (&'static str, Vec<u8>),
        codec: Codec,
        dead_letter: Option<(ErrorKind, String)>,
    },
    /// Sent again with these headers, when its eta is due.
    Again {
        table: FieldTable,
        eta_ms: Option<u64>,
    },
}

impl Decided {
    fn answer(disposition: Disposition<'_>) -> Decided {
        own(disposition, &BasicProperties::default())
    }
}

fn own(disposition: Disposition<'_>, original: &BasicProperties) -> Decided {
    match disposition {
        Disposition::Answer {
            reply,
            codec,
            dead_letter,
        } => Decided::Answer {
            reply,
            codec,
            dead_letter,
        },
        // A retry: what the worker would publish through the delay queues.
        Disposition::Forward { headers, .. } => Decided::Again {
            eta_ms: headers.eta_ms,
            table: headers.write_into(original.headers().clone().unwrap_or_default()),
        },
    }
}

/// Carries out a decision: the reply a caller reads (recording the dead letter a worker would
/// write), or the message to run again.
fn conclude(inner: &Inner, queued: Queued, task: &str, id: &str, decided: Decided) -> Step {
    match decided {
        Decided::Answer {
            reply: (kind, body),
            codec,
            dead_letter,
        } => {
            if let Some((reason, error)) = dead_letter {
                inner.record_dead_letter(DeadLetter {
                    task: task.to_owned(),
                    id: TaskId::from(id),
                    reason: reason.as_str().to_owned(),
                    error,
                });
            }
            Step::Answered(Reply {
                kind: Some(kind.to_owned()),
                content_type: Some(codec.content_type().to_owned()),
                body,
            })
        }
        Decided::Again { table, eta_ms } => {
            let properties = copy_properties(&queued.properties).with_headers(table);
            Step::Again(Box::new(Queued {
                properties,
                due: eta_ms.map_or_else(Instant::now, in_tokio_time),
                ..queued
            }))
        }
    }
}
