//! Errors: [`CallError`] for a call to a task, [`Error`] for connecting and serving. Below every
//! layer: it names no other module of the crate.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Why a call to a task did not produce its value.
///
/// `E` is the task's own error type for a task written `-> Result<T, E>`, and [`Never`]
/// otherwise. [`CallError::Task`] carries that error intact; every other variant is
/// a framework failure, told apart so that callers can react (retry a [`CallError::Timeout`], alert
/// on a [`CallError::SignatureMismatch`], ...).
///
/// `.delay()` returns `CallError` too, restricted to what can go wrong before a worker sees the
/// task: [`NoRoute`](CallError::NoRoute), [`Timeout`](CallError::Timeout) (no publisher confirm
/// in time), [`ConnectionLost`](CallError::ConnectionLost), [`Rejected`](CallError::Rejected)
/// (the broker refused it) and [`Encode`](CallError::Encode). An error from `.delay()` means "not
/// known to be enqueued": the task may still run.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CallError<E = Never> {
    /// The task ran and returned `Err(E)`.
    Task(E),
    /// No answer before the deadline (or no publisher confirm in time, for `.delay()`); also
    /// what a worker answers for a task whose deadline had passed before it could start.
    Timeout,
    /// No queue exists for the task: no worker serving it has ever started (or the queue was
    /// deleted). The message was returned by the broker, not enqueued.
    NoRoute {
        /// The queue the task was published to.
        queue: String,
    },
    /// The connection to the broker failed or dropped while the call was in flight.
    ConnectionLost(String),
    /// The worker that received the task does not serve a task of that name.
    UnknownTask(String),
    /// The worker could not decode the arguments.
    BadPayload(String),
    /// The stub's argument or result types differ from the worker's.
    SignatureMismatch(String),
    /// The handler panicked; the message is the panic's.
    Panicked(String),
    /// The handler ran past the task's time limit and was cancelled.
    TimeLimit(String),
    /// The broker or the worker refused the message (wrong content type, too large, nacked).
    Rejected(String),
    /// The task was revoked (`amqp-tasks revoke`): not run, or cancelled while running
    /// (`--terminate`).
    Revoked,
    /// The worker answered with an error this client does not know as a typed value (from a
    /// service in another language, for instance).
    Remote {
        /// The error's type or kind as the remote side named it.
        kind: String,
        /// Its human-readable message.
        message: String,
    },
    /// The arguments could not be encoded.
    Encode(String),
    /// The reply could not be decoded into the task's result type.
    BadReply(String),
}

impl<E> CallError<E> {
    /// The task's own error, if that is what this is.
    pub fn into_task_error(self) -> Option<E> {
        match self {
            CallError::Task(error) => Some(error),
            _ => None,
        }
    }

    /// True for [`CallError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, CallError::Timeout)
    }

    /// A short machine-readable name of the variant (`"task"`, `"timeout"`, `"no_route"`, ...).
    pub fn kind(&self) -> &str {
        match self {
            CallError::Task(_) => "task",
            CallError::Timeout => "timeout",
            CallError::NoRoute { .. } => "no_route",
            CallError::ConnectionLost(_) => "connection_lost",
            CallError::UnknownTask(_) => "unknown_task",
            CallError::BadPayload(_) => "bad_payload",
            CallError::SignatureMismatch(_) => "signature_mismatch",
            CallError::Panicked(_) => "panicked",
            CallError::TimeLimit(_) => "time_limit",
            CallError::Rejected(_) => "rejected",
            CallError::Revoked => "revoked",
            CallError::Remote { kind, .. } => kind,
            CallError::Encode(_) => "encode",
            CallError::BadReply(_) => "bad_reply",
        }
    }

    /// Changes the task error type, keeping every framework variant.
    pub fn map_task<F>(self, f: impl FnOnce(E) -> F) -> CallError<F> {
        match self {
            CallError::Task(error) => CallError::Task(f(error)),
            CallError::Timeout => CallError::Timeout,
            CallError::NoRoute { queue } => CallError::NoRoute { queue },
            CallError::ConnectionLost(m) => CallError::ConnectionLost(m),
            CallError::UnknownTask(m) => CallError::UnknownTask(m),
            CallError::BadPayload(m) => CallError::BadPayload(m),
            CallError::SignatureMismatch(m) => CallError::SignatureMismatch(m),
            CallError::Panicked(m) => CallError::Panicked(m),
            CallError::TimeLimit(m) => CallError::TimeLimit(m),
            CallError::Rejected(m) => CallError::Rejected(m),
            CallError::Revoked => CallError::Revoked,
            CallError::Remote { kind, message } => CallError::Remote { kind, message },
            CallError::Encode(m) => CallError::Encode(m),
            CallError::BadReply(m) => CallError::BadReply(m),
        }
    }
}

impl CallError<Never> {
    /// Widens an error that cannot carry a task error (from `.delay()` or the transport) to any
    /// task error type.
    pub fn widen<E>(self) -> CallError<E> {
        self.map_task(|never| match never {})
    }
}

impl<E: fmt::Display> fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Task(error) => write!(f, "the task failed: {error}"),
            CallError::Timeout => f.write_str("no answer before the deadline"),
            CallError::NoRoute { queue } => write!(
                f,
                "no queue `{queue}`: no worker serving this task has declared it (start one, or provision the queue)"
            ),
            CallError::ConnectionLost(m) => write!(f, "connection to the broker lost: {m}"),
            CallError::UnknownTask(m) => write!(f, "unknown task: {m}"),
            CallError::BadPayload(m) => write!(f, "the worker could not decode the arguments: {m}"),
            CallError::SignatureMismatch(m) => write!(f, "signature mismatch: {m}"),
            CallError::Panicked(m) => write!(f, "the task panicked: {m}"),
            CallError::TimeLimit(m) => write!(f, "the task ran past its time limit: {m}"),
            CallError::Rejected(m) => write!(f, "rejected: {m}"),
            CallError::Revoked => f.write_str("the task was revoked"),
            CallError::Remote { kind, message } => write!(f, "remote error {kind}: {message}"),
            CallError::Encode(m) => write!(f, "could not encode the arguments: {m}"),
            CallError::BadReply(m) => write!(f, "could not decode the reply: {m}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for CallError<E> {}

/// The error type of a task that cannot fail: uninhabited like
/// [`Infallible`](std::convert::Infallible), and (unlike it) serde-compatible, so that it can
/// stand where a task error type is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Never {}

impl fmt::Display for Never {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

impl std::error::Error for Never {}

/// An error connecting to the broker, configuring or running a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, without its password.
        url: String,
        /// What the AMQP client reported.
        #[source]
        source: BrokerError,
    },
    /// A broker operation failed (declaring a queue, consuming, ...).
    #[error("broker error while {action}: {source}")]
    Broker {
        /// What was being done.
        action: String,
        /// What the AMQP client reported.
        #[source]
        source: BrokerError,
    },
    /// Invalid configuration (a URL, a namespace, a task filter, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Two tasks in this binary share a name.
    #[error(
        "two tasks are named `{name}`: {first} and {second}; give one of them another `name = \"...\"`"
    )]
    DuplicateTask {
        /// The shared name.
        name: String,
        /// Where the first is defined.
        first: String,
        /// Where the second is defined.
        second: String,
    },
    /// The worker would serve no task.
    #[error("{0}")]
    NoTasks(String),
    /// The set-up given to [`worker::main_with`](crate::worker::main_with) failed.
    #[error("the worker's set-up failed: {0}")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A task takes a `State<T>` that the worker was not given.
    #[error("task \"{task}\" needs State<{state}>: add it with WorkerBuilder::state")]
    MissingState {
        /// The task.
        task: String,
        /// The state's type, as written in the task.
        state: String,
    },
    /// The grace period ran out before the tasks in flight finished; they will be redelivered.
    #[error(
        "shutdown grace period of {0:?} ran out with {1} task(s) still running; they will be redelivered"
    )]
    GraceExpired(Duration, usize),
}

/// What the AMQP client library reported, as the source of an [`Error`]: its message, and the
/// library's own error as its [`source`](std::error::Error::source) (so that the library's types
/// are not part of this crate's API).
#[derive(Debug)]
pub struct BrokerError(lapin::Error);

impl BrokerError {
    pub(crate) fn new(error: lapin::Error) -> Self {
        BrokerError(error)
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BrokerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_error_is_an_error_and_maps() {
        fn assert_error<T: std::error::Error>() {}
        assert_error::<CallError>();
        assert_error::<CallError<String>>();
        let e: CallError<u8> = CallError::Task(3);
        assert_eq!(e.clone().map_task(u16::from), CallError::Task(3u16));
        assert_eq!(e.kind(), "task");
        let lost: CallError<u8> = CallError::<Never>::ConnectionLost("x".into()).widen();
        assert_eq!(lost.kind(), "connection_lost");
    }
}
