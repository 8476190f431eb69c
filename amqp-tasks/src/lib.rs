//! Celery-like tasks for Rust over RabbitMQ, typed end to end.
//!
//! ```no_run
//! use amqp_tasks::{task, Client};
//!
//! #[task]
//! pub async fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! # async fn producer() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let id = add::new(1, 2).delay(&client).await?;   // returns once the broker confirmed it
//! let sum = add::new(1, 2).call(&client).await?;   // 3, computed by a worker
//! # Ok(()) }
//!
//! // the worker binary: serves every task linked into it
//! fn main() -> std::process::ExitCode {
//!     amqp_tasks::worker::main()
//! }
//! ```
//!
//! One process can be a producer (sends tasks, awaits answers), a worker (serves tasks) and a
//! relay (while serving a task, calls a task of another service, through its [`Context`]).
//!
//! # What `#[task]` generates
//!
//! For
//!
//! ```
//! # use amqp_tasks::task;
//! # #[derive(Debug, serde::Serialize, serde::Deserialize)] pub enum DivError { ByZero }
//! #[task(name = "math.div", timeout = "5s")]
//! pub async fn div(a: i64, b: i64) -> Result<i64, DivError> {
//!     /* ... */
//! #   if b == 0 { Err(DivError::ByZero) } else { Ok(a / b) }
//! }
//! ```
//!
//! it emits:
//!
//! 1. **the function, unchanged**: `div(6, 3).await` runs it locally (in unit tests, say);
//! 2. **a stub type of the same name**, `pub enum div {}` (types and functions live in separate
//!    namespaces, so both are `div`), with `div::new(a, b) -> TaskCall<div>`;
//! 3. **`impl Task for div`**: the name, the queue, the timeout, the argument tuple
//!    `(i64, i64)`, `Output = i64`, `Error = DivError` (for a task not written `Result<T, E>`,
//!    `Output` is the return type and `Error` is [`Never`]), the
//!    signature fingerprint and the JSON argument mapping;
//! 4. for a function with a body, **a handler and its registration** (through `inventory`), so
//!    that a worker in a binary that links this code serves it. A declaration without a body
//!    (`pub async fn charge(order: Order) -> Receipt;`) generates only 2 and 3: a stub for a task
//!    served elsewhere.
//!
//! Written by hand, the stub part is:
//!
//! ```
//! # use std::time::Duration;
//! # use amqp_tasks::{Codec, CodecError, Param, Signature};
//! # use amqp_tasks::__private::{JsonArgsReader, JsonArgsWriter};
//! # #[derive(Debug, serde::Serialize, serde::Deserialize)] pub enum DivError { ByZero }
//! #[allow(non_camel_case_types)]
//! pub enum div {}
//!
//! impl div {
//!     pub fn new(a: i64, b: i64) -> amqp_tasks::TaskCall<div> {
//!         amqp_tasks::TaskCall::new((a, b))
//!     }
//! }
//!
//! impl amqp_tasks::Task for div {
//!     type Args = (i64, i64);
//!     type Output = i64;
//!     type Error = DivError;
//!     const NAME: &'static str = "math.div";
//!     const QUEUE: &'static str = "math.div";
//!     const TIMEOUT: Duration = Duration::from_secs(5);
//!     // RETRIES, BACKOFF, CODEC, PARAMS, OUTPUT, signature(), write_json(), read_json()
//! #   const RETRIES: u32 = 0;
//! #   const BACKOFF: Duration = Duration::from_secs(1);
//! #   const RETRY_ON_PANIC: bool = false;
//! #   const CODEC: Codec = Codec::Bincode;
//! #   const PARAMS: &'static [Param] = &[Param { name: "a", ty: "i64" }, Param { name: "b", ty: "i64" }];
//! #   const OUTPUT: &'static str = "Result<i64, DivError>";
//! #   fn signature() -> &'static Signature {
//! #       static SIGNATURE: std::sync::OnceLock<Signature> = std::sync::OnceLock::new();
//! #       SIGNATURE.get_or_init(|| Signature::of_task(["(i64, i64)", "i64", "DivError"], ["", "", ""]))
//! #   }
//! #   fn write_json(args: &Self::Args, writer: &mut JsonArgsWriter) -> Result<(), CodecError> {
//! #       writer.arg("a", &args.0)?;
//! #       writer.arg("b", &args.1)
//! #   }
//! #   fn read_json(reader: &mut JsonArgsReader) -> Result<Self::Args, CodecError> {
//! #       Ok((reader.arg("a")?, reader.arg("b")?))
//! #   }
//! #   fn error_message(error: &DivError) -> String { format!("{error:?}") }
//! #   fn should_retry(_: &DivError) -> bool { true }
//! }
//! ```
//!
//! Attribute keys: `name` (default: the function's name), `queue` (default: the name; tasks that
//! share a queue are served by one consumer), `timeout` (the handler's time limit and the default
//! deadline of calls; seconds or `"500ms"`, `"30s"`, `"2m"`, `"1h 30m"`; default 60 s),
//! `retries`, `backoff`, `retry_on_panic`, `codec` (`"bincode"`, the default, or `"json"`),
//! `store_result`; see
//! [`task`] for each. Any other key is a compile error that lists these.
//!
//! Arguments and results must be `Serialize + DeserializeOwned + Send + 'static`; a first
//! parameter of type [`Context`], and after it any [`State<T>`](State) parameters (the
//! application's resources, given to the worker with
//! [`WorkerBuilder::state`]), are given by the worker and are not part of the stub. The function
//! must be `async`, without `self`, generics or patterns in its parameters: each is a compile
//! error pointing at the offending tokens.
//!
//! # Errors
//!
//! `.call()` returns `Result<T, CallError<E>>`: [`CallError::Task`] carries the task's own error
//! intact; the other variants tell framework failures apart. Nothing waits forever: every call has
//! a deadline, and `.delay()` a deadline for its publisher confirm.
//!
//! # Binaries that serve tasks of another crate
//!
//! Tasks register at link time, and a crate that nothing references is not linked: write
//! `use that_crate as _;` in the worker binary. A worker with no tasks refuses to start, as does
//! one where two tasks share a name.
//!
//! The wire format is documented in [`wire`]; the queues in [`topology`].
//!
//! # Layers
//!
//! The crate is built in layers that import downward only:
//!
//! | layer | owns | must not |
//! |---|---|---|
//! | `protocol` | headers, replies and their [`CallError`]s, dead letters, [`topology`], [`codec`]s, signatures, trace ids, durations, the retry policy: pure data, documented in [`wire`] | do I/O |
//! | `transport` | one broker session: connecting and reconnecting, publishing with confirms, reply routing, probes, declaring | know about tasks |
//! | `client` | [`Client`], [`TaskCall`], [`DynamicCall`], [`Caller`]: sending calls within their deadlines | know how tasks are served |
//! | `worker` | [`Worker`], the [`registry`], the pipeline of a delivery (admit → execute → decide → dispose → settle), the [`worker::dlq`] tools, the `worker` command line | be imported by the layers below |
//! | [`testing`] | [`TestWorker`](testing::TestWorker): the worker's pipeline minus the broker, behind a [`Client`] of its own | be imported by the layers below |
//!
//! Beside them: [`Task`] (a task's types and settings), [`Context`] (what a running task knows,
//! a caller above the client layer), [`State`] (what a worker shares with its tasks), the `#[task]` support traits ([`Retryable`]) and
//! [`Error`]/[`CallError`].
//!
//! # Features
//!
//! - `cli` (default): the `worker` binary's command line ([`worker::main`]), the `amqp-tasks`
//!   shell command ([`shell`]), and logging to stderr. Turn it off (`default-features = false`)
//!   to embed a worker without clap and tracing-subscriber.
//! - `metrics` (default): [`WorkerBuilder::metrics_addr`] (`worker --metrics-addr`), Prometheus
//!   metrics over HTTP, with `prometheus-client` and hyper.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

// Lets the crate's own tests use `#[task]`, whose expansion names `::amqp_tasks`.
#[cfg(test)]
extern crate self as amqp_tasks;
#[cfg(test)]
mod fuzz;

mod client;
mod context;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handler;
#[cfg(feature = "opentelemetry")]
mod otel;
mod protocol;
mod results;
#[cfg(feature = "cli")]
pub mod shell;
mod state;
mod task;
pub mod testing;
mod transport;
pub mod wire;
pub mod worker;

pub use protocol::codec;
pub use protocol::schedule;
pub use protocol::topology;
pub use worker::registry;

/// Turns an `async fn` into a task.
///
/// ```
/// # use amqp_tasks::task;
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)] pub enum DivError { ByZero }
/// #[task(name = "math.div", queue = "math", timeout = "5s", retries = 3, backoff = "1s",
///        retry_on_panic = false, codec = "bincode")]
/// pub async fn div(a: i64, b: i64) -> Result<i64, DivError> {
///     /* ... */
/// #   if b == 0 { Err(DivError::ByZero) } else { Ok(a / b) }
/// }
/// ```
///
/// Every key is optional:
///
/// | key | meaning | default |
/// |---|---|---|
/// | `name` | the task name on the wire, stable across services | the function's name |
/// | `queue` | the queue it is sent to (tasks may share one) | the name |
/// | `timeout` | the handler's time limit, and the default deadline of calls (seconds, or `"500ms"`, `"30s"`, `"2m"`, `"1h"`) | 60 s |
/// | `retries` | attempts after the first when the task returns `Err` (see [`Retryable`]) | 0 |
/// | `backoff` | delay before the first retry, doubled each time, each delay ±20 % | 1 s |
/// | `retry_on_panic` | retry a panic like an error | `false` |
/// | `codec` | `"bincode"` or `"json"`, for calls through the stub | `"bincode"` |
/// | `store_result` | whether a worker with a result store (`--results`) keeps its states and results | `true` |
/// | `every` | a periodic task, ticking at the Unix times divisible by this interval (`"30s"`) | |
/// | `cron` | a periodic task on a six-field cron expression, `"sec min hour dom month dow"` (UTC, Sunday = 0) | |
/// | `catch_up` | `"one"`: after a gap, fire the latest missed tick once; `"none"`: fire none | `"one"` |
///
/// A periodic task takes no arguments besides its `Context` and `State`s; the active
/// scheduler among the workers started with `--beat` sends its ticks (see
/// [`schedule`] and the README's "Periodic tasks").
///
/// It generates, next to the unchanged function: a stub type of the same name with `new(args…)`
/// returning a [`TaskCall`], its [`Task`] implementation, and (for a function with a body) a
/// handler registered for the worker. A function without a body declares a task served
/// elsewhere: only the stub is generated. See the [crate documentation](crate#what-task-generates)
/// for the hand-written equivalent.
///
/// Parameters, in order: an optional [`Context`], then any [`State<T>`](State)s (one per type
/// the task needs, given to the worker with [`WorkerBuilder::state`]; a worker without them
/// refuses to start), then the arguments, which alone make up the stub and its signature.
///
/// Misuse is a compile error at the offending tokens: a function that is not `async`, takes
/// `self`, is generic, has a pattern for a parameter, borrows an argument, puts `Context`
/// anywhere but first or takes two, puts a `State` after an argument, shares a type that is not
/// `Send + Sync` as state, an unknown key (the error lists the valid ones), or a bad schedule
/// (arguments on a periodic task, both `every` and `cron`, a bad interval, a cron expression
/// without six fields, an unknown `catch_up`).
///
/// A task may run at most RabbitMQ's `consumer_timeout` (30 minutes by default): past it the
/// broker closes the worker's channel and redelivers the task.
pub use amqp_tasks_macros::task;
pub use client::{
    Caller, Client, ClientBuilder, DEFAULT_URL, DynamicCall, QueueStatus, TaskCall, TaskFailure,
};
pub use codec::{Codec, CodecError};
pub use context::Context;
pub use error::{BrokerError, CallError, Error, Never};
pub use handler::Retryable;
pub use protocol::signature::Signature;
pub use results::{DEFAULT_RESULT_TTL, TaskState, TaskStatus};
pub use state::State;
pub use task::{Param, Task, TaskId};
pub use topology::QueueType;
pub use worker::{Worker, WorkerBuilder};

/// The README's examples, compiled as doctests so that they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

#[doc(hidden)]
pub mod __private {
    //! Used by the code `#[task]` generates; not a public API.
    pub use crate::client::caller::Origin;
    pub use crate::handler::{Handler, message, retry};
    pub use crate::protocol::json_args::{JsonArgsReader, JsonArgsWriter};
    pub use crate::protocol::schedule::{CatchUp, Schedule};
    pub use crate::protocol::signature::Signature;
    pub use crate::state::{MissingState, StateNeed, StateValue};
    pub use crate::task::{DEFAULT_BACKOFF, DEFAULT_TIMEOUT, Param};
    pub use crate::worker::registry::Registration;
    pub use inventory;

    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// What a task argument must be.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be a task argument",
        label = "must be `Serialize + DeserializeOwned + Send + 'static`",
        note = "derive `serde::Serialize` and `serde::Deserialize` for it"
    )]
    pub trait TaskArgument {}
    impl<T: Serialize + DeserializeOwned + Send + 'static> TaskArgument for T {}

    /// What a task result must be.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be a task result",
        label = "must be `Serialize + DeserializeOwned + Send + 'static`",
        note = "derive `serde::Serialize` and `serde::Deserialize` for it"
    )]
    pub trait TaskOutput {}
    impl<T: Serialize + DeserializeOwned + Send + 'static> TaskOutput for T {}

    /// Spans a missing bound on the user's argument type.
    pub fn assert_argument<T: TaskArgument>() {}
    /// Spans a missing bound on the user's result type.
    pub fn assert_output<T: TaskOutput>() {}
    /// Spans a missing bound on the user's error type.
    pub fn assert_error<T: TaskOutput>() {}
    /// The `State<T>` a task takes, from the context of its run (its bound spans a type that
    /// cannot be shared state).
    pub fn state<T: StateValue>(
        ctx: &crate::Context,
        task: &'static str,
        written: &'static str,
    ) -> Result<crate::State<T>, MissingState> {
        ctx.state::<T>().ok_or(MissingState {
            task,
            state: written,
        })
    }
}
