//! Tasks as types: the [`Task`] trait the macro implements for each stub, and [`TaskCall`], the
//! typed call that `NAME::new(args…)` builds.

use crate::client::Client;
use crate::codec::{Codec, CodecError};
use crate::context::Context;
use crate::error::CallError;
use crate::send::{self, Outgoing};
use crate::signature::Signature;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::time::{Duration, SystemTime};

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
    /// Whether a panic is retried like an error (`retry_on_panic = true`).
    const RETRY_ON_PANIC: bool;
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
        TaskId(crate::trace::random_uuid().to_string())
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
    eta: Option<SystemTime>,
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
            eta: None,
            codec: T::CODEC,
            task_id: None,
        }
    }

    /// Shortens the deadline of `.call()` (it cannot be longer than its default).
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

    /// Runs the task after this delay (held by the broker, resolution 100 ms; see
    /// [`topology`](crate::topology)).
    pub fn countdown(mut self, delay: Duration) -> Self {
        self.eta = Some(SystemTime::now() + delay);
        self
    }

    /// Runs the task not before this time (held by the broker, resolution 100 ms).
    pub fn eta(mut self, eta: SystemTime) -> Self {
        self.eta = Some(eta);
        self
    }

    /// Fire and forget: returns the task id once the broker has confirmed the message
    /// (persistent, in a durable queue).
    ///
    /// Concurrent `.delay()`s pipeline their publishes and confirms; to send many from one
    /// place, [`Client::delay_all`] does it for you.
    pub async fn delay(self, caller: &impl Caller) -> Result<TaskId, CallError> {
        let origin = caller.origin();
        let out = self.outgoing()?;
        send::delay(&origin, out).await
    }

    /// Sends the task and awaits its result, until the deadline: by default, the task's
    /// `timeout` for each attempt it may make, plus its retry backoffs, plus one second (so that
    /// a time-limit error can still reach the caller); shortened by [`TaskCall::timeout`] and,
    /// from a [`Context`], by the caller's own remaining deadline.
    pub async fn call(self, caller: &impl Caller) -> Result<T::Output, CallError<T::Error>> {
        let origin = caller.origin();
        let codec = self.codec;
        let out = self.outgoing().map_err(CallError::widen)?;
        let reply = send::call(&origin, out).await.map_err(CallError::widen)?;
        send::decode_reply::<T::Output, T::Error>(reply, codec)
    }

    pub(crate) fn outgoing(self) -> Result<Outgoing<'static>, CallError> {
        let body = self
            .codec
            .encode_args::<T>(&self.args)
            .map_err(|e| CallError::Encode(e.to_string()))?;
        Ok(Outgoing {
            name: T::NAME,
            queue: T::QUEUE,
            signature: Some(T::signature().fingerprint()),
            codec: self.codec,
            body,
            id: self.task_id.unwrap_or_default(),
            eta: self.eta,
            ceiling: send::ceiling(T::TIMEOUT, T::RETRIES, T::BACKOFF),
            timeout: self.timeout,
        })
    }
}

impl Client {
    /// Sends many calls of one task at once (fire and forget): every message is published before
    /// the first confirm is awaited, so a batch costs about one broker round trip, not one per
    /// task. One result per call, in order; see [`TaskCall::delay`].
    ///
    /// ```no_run
    /// # use amqp_tasks::{task, Client};
    /// # #[task] async fn resize(url: String, width: u32) {}
    /// # async fn example(client: &Client, urls: Vec<String>) {
    /// let calls = urls.into_iter().map(|url| resize::new(url, 640));
    /// for sent in client.delay_all(calls).await {
    ///     if let Err(error) = sent {
    ///         eprintln!("not sent: {error}");
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn delay_all<T: Task>(
        &self,
        calls: impl IntoIterator<Item = TaskCall<T>>,
    ) -> Vec<Result<TaskId, CallError>> {
        let origin = sealed::Sealed::origin(self);
        let outs = calls.into_iter().map(TaskCall::outgoing).collect();
        send::delay_batch(&origin, outs).await
    }
}
