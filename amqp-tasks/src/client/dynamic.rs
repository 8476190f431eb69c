//! [`DynamicCall`]: a call of a task by name with JSON arguments, for callers that have no stub
//! (shells, tools, other languages' conventions); [`TaskFailure`], the task error it receives.

use super::call::{Outgoing, TRANSIT_ALLOWANCE, call, delay};
use super::caller::Caller;
use crate::error::CallError;
use crate::protocol::codec::Codec;
use crate::protocol::reply::decode_reply_with;
use crate::task::TaskId;
use std::time::{Duration, SystemTime};

/// A task's own error, as a [`DynamicCall`] receives it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct TaskFailure {
    /// The error's type name (`DivError`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Its message (`division by zero`).
    pub message: String,
    /// The error value as JSON (`"ByZero"`).
    pub value: serde_json::Value,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.type_name, self.message, self.value)
    }
}

impl std::error::Error for TaskFailure {}

/// A call of the task `name` with a JSON object of arguments keyed by parameter name.
///
/// It sends no signature fingerprint, so none is checked; the worker checks the JSON keys and
/// types against the task's parameters and answers `BadPayload` naming the argument at fault.
///
/// ```no_run
/// # async fn example(client: &amqp_tasks::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use amqp_tasks::DynamicCall;
/// let sum = DynamicCall::new("add", serde_json::json!({"a": 1, "b": 2})).call(client).await?;
/// assert_eq!(sum, 3);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a DynamicCall does nothing until `.delay(&caller)` or `.call(&caller)`"]
pub struct DynamicCall {
    name: String,
    queue: Option<String>,
    args: serde_json::Value,
    timeout: Option<Duration>,
    eta: Option<SystemTime>,
    task_id: Option<TaskId>,
}

impl DynamicCall {
    /// A call of `name` with `args`, a JSON object (`{"a": 1, "b": 2}`).
    pub fn new(name: impl Into<String>, args: serde_json::Value) -> Self {
        DynamicCall {
            name: name.into(),
            queue: None,
            args,
            timeout: None,
            eta: None,
            task_id: None,
        }
    }

    /// The task's queue, when it is not named after the task (`#[task(queue = "...")]`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// How long `.call()` waits (default: 61 s, a task's default time limit plus one second).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs the task after this delay (held by the broker).
    pub fn countdown(mut self, delay: Duration) -> Self {
        self.eta = Some(crate::protocol::later(
            SystemTime::now(),
            delay,
            crate::protocol::MAX_ETA_AHEAD,
        ));
        self
    }

    /// Uses this task id instead of a fresh one.
    pub fn task_id(mut self, id: impl Into<TaskId>) -> Self {
        self.task_id = Some(id.into());
        self
    }

    /// Fire and forget: returns the task id once the broker has confirmed the message.
    pub async fn delay(self, caller: &impl Caller) -> Result<TaskId, CallError> {
        let origin = caller.origin();
        let queue = self.queue.clone().unwrap_or_else(|| self.name.clone());
        let out = self.outgoing(&queue)?;
        delay(&origin, out).await
    }

    /// Sends the task and awaits its JSON result; a task error arrives as
    /// [`CallError::Task`] with its type, message and JSON value (or as [`CallError::Remote`]
    /// from a sender that gives no value).
    pub async fn call(
        self,
        caller: &impl Caller,
    ) -> Result<serde_json::Value, CallError<TaskFailure>> {
        let origin = caller.origin();
        let queue = self.queue.clone().unwrap_or_else(|| self.name.clone());
        let out = self.outgoing(&queue).map_err(CallError::widen)?;
        let reply = call(&origin, out).await.map_err(CallError::widen)?;
        decode_reply_with(reply, Codec::Json, |value, type_name, message| {
            TaskFailure {
                type_name,
                message,
                value,
            }
        })
    }

    fn outgoing<'a>(&'a self, queue: &'a str) -> Result<Outgoing<'a>, CallError> {
        if !self.args.is_object() {
            return Err(CallError::Encode(
                "the arguments must be a JSON object keyed by parameter name".to_owned(),
            ));
        }
        let body = Codec::Json
            .encode(&self.args)
            .map_err(|e| CallError::Encode(e.to_string()))?;
        let default = crate::task::DEFAULT_TIMEOUT + TRANSIT_ALLOWANCE;
        Ok(Outgoing {
            name: &self.name,
            queue,
            signature: None,
            codec: Codec::Json,
            body,
            id: self.task_id.clone().unwrap_or_default(),
            eta: self.eta,
            ceiling: self.timeout.unwrap_or(default),
            timeout: self.timeout,
        })
    }
}
