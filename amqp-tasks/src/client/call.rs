//! Calls: [`TaskCall`], the typed call that `NAME::new(args…)` builds, and what sending any call
//! means (typed or [`DynamicCall`](super::DynamicCall)): the envelope of properties and headers,
//! the deadline (the task's time limit for each attempt it may make, plus its retry backoffs,
//! shortened by the caller's `.timeout()` and a parent task's remaining time), fire and forget
//! with a confirm, or a request awaiting its reply.

use super::Client;
use super::caller::{Caller, Origin, Parent, sealed};
use crate::error::CallError;
use crate::protocol::codec::Codec;
use crate::protocol::headers::TaskHeaders;
use crate::protocol::properties::task_properties;
use crate::protocol::reply::{Reply, decode_reply};
use crate::protocol::retry::RetryPolicy;
use crate::protocol::{MAX_DELAY, MAX_ETA_AHEAD, SHORT_MAX, expiration, later, unix_ms};
use crate::task::{Task, TaskId, encode_args};
use crate::transport::publish::Message;
use lapin::BasicProperties;
use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

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

    /// Sets how long `.call()` waits (default: see [`call`](TaskCall::call)). It may be longer
    /// than the task's time limit: a call may wait in a busy queue longer than the task runs.
    /// From a [`Context`](crate::Context), the caller's own remaining deadline still bounds it.
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
    ///
    /// A countdown longer than a hundred years is cut to that.
    pub fn countdown(mut self, delay: Duration) -> Self {
        self.eta = Some(later(SystemTime::now(), delay, MAX_ETA_AHEAD));
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
        delay(&origin, out).await
    }

    /// Sends the task and awaits its result, until the deadline: by default, the task's
    /// `timeout` for each attempt it may make, plus its retry backoffs, plus one second (so that
    /// a time-limit error can still reach the caller), plus its countdown if it has one; or what
    /// [`TaskCall::timeout`] says; and, from a [`Context`](crate::Context), never past the
    /// caller's own remaining deadline.
    pub async fn call(self, caller: &impl Caller) -> Result<T::Output, CallError<T::Error>> {
        let origin = caller.origin();
        let codec = self.codec;
        let out = self.outgoing().map_err(CallError::widen)?;
        let reply = call(&origin, out).await.map_err(CallError::widen)?;
        decode_reply::<T::Output, T::Error>(reply, codec)
    }

    pub(crate) fn outgoing(self) -> Result<Outgoing<'static>, CallError> {
        let body = encode_args::<T>(self.codec, &self.args)
            .map_err(|e| CallError::Encode(e.to_string()))?;
        Ok(Outgoing {
            name: T::NAME,
            queue: T::QUEUE,
            signature: Some(T::signature().fingerprint()),
            codec: self.codec,
            body,
            id: self.task_id.unwrap_or_default(),
            eta: self.eta,
            ceiling: ceiling(T::TIMEOUT, T::RETRIES, T::BACKOFF),
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
        delay_batch(&origin, outs).await
    }
}

/// How much longer than a task may run a call waits by default: the time for a time-limit error
/// to travel back.
pub(crate) const TRANSIT_ALLOWANCE: Duration = Duration::from_secs(1);

/// An outgoing task message, before it is addressed.
pub(crate) struct Outgoing<'a> {
    pub(crate) name: &'a str,
    /// The task queue, before the namespace.
    pub(crate) queue: &'a str,
    pub(crate) signature: Option<&'a str>,
    pub(crate) codec: Codec,
    pub(crate) body: Vec<u8>,
    pub(crate) id: TaskId,
    pub(crate) eta: Option<SystemTime>,
    /// The longest a `.call()` may wait.
    pub(crate) ceiling: Duration,
    /// What the caller asked for.
    pub(crate) timeout: Option<Duration>,
}

impl Outgoing<'_> {
    /// The broker-side queue, once the call is known to fit AMQP's limits: a task id or routing
    /// key longer than a short string is refused here, never cut.
    fn address(&self, client: &Client) -> Result<String, CallError> {
        let id = self.id.as_str();
        if id.len() > SHORT_MAX {
            return Err(CallError::Rejected(format!(
                "the task id is {} bytes; AMQP allows at most {SHORT_MAX}",
                id.len()
            )));
        }
        let queue = client.queue_name(self.queue);
        if queue.len() > SHORT_MAX {
            return Err(CallError::Rejected(format!(
                "the queue name `{}…` is {} bytes; AMQP allows at most {SHORT_MAX}",
                queue.chars().take(40).collect::<String>(),
                queue.len()
            )));
        }
        Ok(queue)
    }
}

/// The default deadline of calls to a task: every attempt may take its whole time limit, and
/// every retry its longest backoff.
pub(crate) fn ceiling(timeout: Duration, retries: u32, backoff: Duration) -> Duration {
    let attempts = timeout.saturating_mul(retries.saturating_add(1));
    let waits = RetryPolicy::task(backoff).longest_total(retries);
    attempts
        .saturating_add(waits)
        .saturating_add(TRANSIT_ALLOWANCE)
}

pub(crate) async fn delay(origin: &Origin<'_>, out: Outgoing<'_>) -> Result<TaskId, CallError> {
    let client = origin.client;
    let eta_ms = out.eta.map(unix_ms);
    let properties = envelope(origin, &out, None, eta_ms).with_delivery_mode(2);
    let queue = out.address(client)?;
    let deadline = Instant::now() + client.confirm_timeout();
    client
        .publish(&queue, &out.body, properties, eta_ms, deadline)
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
        match out.and_then(|out| Ok((out.address(client)?, out))) {
            Ok((queue, out)) => {
                let eta_ms = out.eta.map(unix_ms);
                let properties = envelope(origin, &out, None, eta_ms).with_delivery_mode(2);
                messages.push(Message {
                    queue,
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
    let queue = out.address(client)?;
    // A call waits for the task to become due, then for it to run: the countdown is added to
    // the default. Within what an expiration can express (a `.timeout(Duration::MAX)` is about
    // 49 days).
    let countdown = out
        .eta
        .and_then(|eta| eta.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    let mut budget = out
        .timeout
        .unwrap_or_else(|| out.ceiling.saturating_add(countdown))
        .min(MAX_DELAY);
    if let Some(remaining) = origin.parent.and_then(Parent::remaining) {
        budget = budget.min(remaining);
    }
    if budget.is_zero() {
        return Err(CallError::Timeout);
    }
    let deadline_ms = unix_ms(SystemTime::now() + budget);
    let eta_ms = out.eta.map(unix_ms);
    if eta_ms.is_some_and(|eta| eta >= deadline_ms) {
        return Err(CallError::Rejected(
            "the eta is past the call's deadline: give the call a `.timeout()` longer than its \
             countdown, or `.delay()` it"
                .to_owned(),
        ));
    }
    let properties = envelope(origin, &out, Some(deadline_ms), eta_ms)
        .with_delivery_mode(1)
        .with_expiration(expiration(
            u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        ));

    // A task waiting on another task is not running: its concurrency slot goes back to the
    // worker, so that relays calling tasks of their own process cannot deadlock it.
    let suspended = origin.parent.map(Parent::suspend);
    let reply = client
        .request(
            &queue,
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
    // A root task sends no root id (it is its own) and no trace (the worker starts one), unless
    // it is sent inside an OpenTelemetry span: then it carries that span's context, as does a
    // call from a task (its `task` span's, or that of a span the task opened).
    let parent = origin.parent;
    #[cfg(feature = "opentelemetry")]
    let current = crate::otel::current();
    #[cfg(not(feature = "opentelemetry"))]
    let current = None;
    let traceparent = current
        .or_else(|| parent.map(|p| p.trace.child()))
        .map(|trace| trace.to_string());
    let headers = TaskHeaders {
        task: Some(Cow::Borrowed(out.name)),
        signature: out.signature.map(Cow::Borrowed),
        attempt: 1,
        deadline_ms,
        eta_ms,
        root_id: parent.map(|p| Cow::Borrowed(p.root_id.as_str())),
        parent_id: parent.map(|p| Cow::Borrowed(p.task_id.as_str())),
        traceparent: traceparent.map(Cow::Owned),
        ..TaskHeaders::default()
    };
    task_properties(out.id.as_str(), out.codec, headers.to_table())
}
