//! Tasks as types: the [`Task`] trait the macro implements for each stub, and [`TaskCall`], the
//! typed call that `NAME::new(args…)` builds.

use crate::client::{Client, Reply};
use crate::codec::{Codec, CodecError};
use crate::context::Context;
use crate::error::CallError;
use crate::signature::Signature;
use crate::trace::TraceParent;
use crate::wire::{self, ErrorKind, TaskHeaders};
use lapin::BasicProperties;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How much longer than a task's time limit a call waits by default: the time for a time-limit
/// error to travel back.
const TRANSIT_ALLOWANCE: Duration = Duration::from_secs(1);

/// A task's identity and types. `#[task]` implements it for the stub type it generates; you do
/// not implement it by hand.
pub trait Task: Send + Sync + 'static {
    /// The arguments, as a tuple in parameter order (the `Context` parameter excluded).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What a call returns on success: `T` for a task written `-> T` or `-> Result<T, E>`.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// The task's own error: `E` for `-> Result<T, E>`, [`Never`](crate::Never) otherwise.
    type Error: Serialize + DeserializeOwned + Send + 'static;
    /// The task name (`name = "..."`, or the function's name).
    const NAME: &'static str;
    /// The queue it is sent to (`queue = "..."`, or the name), before any namespace prefix.
    const QUEUE: &'static str;
    /// The handler's time limit and the default deadline of calls (`timeout = ...`).
    const TIMEOUT: Duration;
    /// How many times a failed run is retried (`retries = ...`).
    const RETRIES: u32;
    /// The first retry delay, doubled for each further attempt (`backoff = ...`).
    const BACKOFF: Duration;
    /// The codec of calls made through the stub (`codec = "..."`).
    const CODEC: Codec;
    /// The parameters, for listings and JSON keys.
    const PARAMS: &'static [Param];
    /// The return type as written.
    const OUTPUT: &'static str;
    /// The signature fingerprint sent with every call.
    fn signature() -> &'static Signature;
    /// Writes the arguments as a JSON object (generated per task).
    fn write_json(
        args: &Self::Args,
        writer: &mut crate::codec::JsonArgsWriter,
    ) -> Result<(), CodecError>;
    /// Reads the arguments from a JSON object (generated per task).
    fn read_json(reader: &mut crate::codec::JsonArgsReader) -> Result<Self::Args, CodecError>;
}

/// A parameter of a task: its name (the JSON key) and its type as written.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// The parameter name.
    pub name: &'static str,
    /// The type as written in the source.
    pub ty: &'static str,
}

/// A task id: a UUID, the `message_id` of the task's messages; stable across retries and replays,
/// so that handlers can be idempotent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    /// A new random id.
    pub fn new() -> TaskId {
        TaskId(uuid::Uuid::new_v4().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TaskId {
    fn default() -> Self {
        TaskId::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for TaskId {
    fn from(id: String) -> Self {
        TaskId(id)
    }
}

impl From<&str> for TaskId {
    fn from(id: &str) -> Self {
        TaskId(id.to_owned())
    }
}

mod sealed {
    pub trait Sealed {
        fn origin(&self) -> super::Origin<'_>;
    }
}

/// Something a task can be sent from: a [`Client`], or the [`Context`] of a running task (then
/// the call inherits its trace and, for `.call()`, its remaining deadline).
pub trait Caller: sealed::Sealed + Sync {}

#[doc(hidden)]
pub struct Origin<'a> {
    pub(crate) client: &'a Client,
    pub(crate) parent: Option<&'a Context>,
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

impl sealed::Sealed for Context {
    fn origin(&self) -> Origin<'_> {
        Origin {
            client: self.client(),
            parent: Some(self),
        }
    }
}
impl Caller for Context {}

/// A typed call of task `T`, built by `T::new(args…)`; options chain before
/// [`delay`](TaskCall::delay) or [`call`](TaskCall::call).
#[must_use = "a TaskCall does nothing until `.delay(&caller)` or `.call(&caller)`"]
pub struct TaskCall<T: Task> {
    args: T::Args,
    timeout: Option<Duration>,
    codec: Codec,
    task_id: Option<TaskId>,
}

impl<T: Task> fmt::Debug for TaskCall<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskCall")
            .field("task", &T::NAME)
            .field("timeout", &self.timeout)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl<T: Task> TaskCall<T> {
    /// A call with these arguments (what `T::new(args…)` does).
    pub fn new(args: T::Args) -> Self {
        TaskCall {
            args,
            timeout: None,
            codec: T::CODEC,
            task_id: None,
        }
    }

    /// Shortens the deadline of `.call()` (it cannot be longer than the task's `timeout` plus
    /// one second).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the arguments in this codec instead of the task's.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Uses this task id instead of a fresh one (an idempotency key chosen by the caller).
    pub fn task_id(mut self, id: impl Into<TaskId>) -> Self {
        self.task_id = Some(id.into());
        self
    }

    /// Fire and forget: returns the task id once the broker has confirmed the message
    /// (persistent, in a durable queue).
    ///
    /// Concurrent `.delay()`s pipeline their publishes and confirms.
    pub async fn delay(self, caller: &impl Caller) -> Result<TaskId, CallError> {
        let origin = caller.origin();
        let client = origin.client;
        let (id, body, properties) = self.prepare(&origin, None)?;
        let properties = properties.with_delivery_mode(2);
        let deadline = Instant::now() + client.confirm_timeout();
        client
            .publish(&client.queue_name(T::QUEUE), &body, properties, deadline)
            .await?;
        tracing::debug!(task = T::NAME, id = %id, "task sent");
        Ok(id)
    }

    /// Sends the task and awaits its result, until the deadline: the task's `timeout` (plus one
    /// second, so that a time-limit error can still reach the caller), shortened by
    /// [`TaskCall::timeout`] and, from a [`Context`], by the caller's own remaining deadline.
    pub async fn call(self, caller: &impl Caller) -> Result<T::Output, CallError<T::Error>> {
        let origin = caller.origin();
        let client = origin.client;
        let ceiling = T::TIMEOUT + TRANSIT_ALLOWANCE;
        let mut budget = self.timeout.map_or(ceiling, |t| t.min(ceiling));
        if let Some(remaining) = origin.parent.and_then(Context::remaining) {
            budget = budget.min(remaining);
        }
        if budget.is_zero() {
            return Err(CallError::Timeout);
        }
        let deadline = Instant::now() + budget;
        let deadline_ms = unix_ms(SystemTime::now() + budget);
        let codec = self.codec;
        let (id, body, properties) = self
            .prepare(&origin, Some(deadline_ms))
            .map_err(CallError::widen)?;
        let properties = properties
            .with_delivery_mode(1)
            .with_expiration(wire::short(&budget.as_millis().max(1).to_string()));

        // A task waiting on another task is not running: its concurrency slot goes back to the
        // worker, so relays calling tasks of their own process cannot deadlock it.
        let suspended = origin.parent.map(Context::suspend);
        let reply = client
            .request(&client.queue_name(T::QUEUE), &body, properties, deadline)
            .await;
        if let Some(suspended) = suspended {
            suspended.resume().await;
        }
        let reply = reply.map_err(CallError::widen)?;
        tracing::debug!(task = T::NAME, id = %id, status = reply.kind.as_deref().unwrap_or(""), "reply received");
        decode_reply::<T>(reply, codec)
    }

    fn prepare(
        self,
        origin: &Origin<'_>,
        deadline_ms: Option<u64>,
    ) -> Result<(TaskId, Vec<u8>, BasicProperties), CallError> {
        let body = self
            .codec
            .encode_args::<T>(&self.args)
            .map_err(|e| CallError::Encode(e.to_string()))?;
        let id = self.task_id.unwrap_or_default();
        let parent = origin.parent;
        let trace = parent.map_or_else(TraceParent::new_root, |p| p.trace().child());
        let headers = TaskHeaders {
            task: Some(T::NAME.to_owned()),
            wire: Some(wire::WIRE_VERSION),
            signature: Some(T::signature().fingerprint().to_owned()),
            attempt: 1,
            deadline_ms,
            eta_ms: None,
            root_id: Some(parent.map_or_else(|| id.to_string(), |p| p.root_id().to_string())),
            parent_id: parent.map(|p| p.task_id().to_string()),
            traceparent: Some(trace.to_string()),
        };
        let properties = BasicProperties::default()
            .with_message_id(wire::short(id.as_str()))
            .with_content_type(self.codec.content_type().into())
            .with_type(wire::TYPE_CALL.into())
            .with_headers(headers.to_table());
        Ok((id, body, properties))
    }
}

fn decode_reply<T: Task>(
    reply: Reply,
    request_codec: Codec,
) -> Result<T::Output, CallError<T::Error>> {
    let codec = reply
        .content_type
        .as_deref()
        .and_then(Codec::from_content_type)
        .unwrap_or(request_codec);
    match reply.kind.as_deref() {
        Some(wire::TYPE_ERROR) => {
            let error = wire::decode_error::<T::Error>(codec, &reply.body)
                .map_err(|e| CallError::BadReply(format!("error reply: {e}")))?;
            Err(into_call_error(error))
        }
        _ => codec
            .decode::<T::Output>(&reply.body)
            .map_err(|e| CallError::BadReply(e.to_string())),
    }
}

fn into_call_error<E>(error: wire::ReceivedError<E>) -> CallError<E> {
    let message = error.message;
    match error.kind.as_deref().and_then(ErrorKind::parse) {
        Some(ErrorKind::Task) => match error.value {
            Some(value) => CallError::Task(value),
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
        Some(ErrorKind::UnsupportedContentType | ErrorKind::TooLarge) => {
            CallError::Rejected(message)
        }
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
