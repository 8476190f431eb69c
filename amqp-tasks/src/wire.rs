//! The wire format: what a task and its reply look like on the broker. It is stable and meant to
//! be spoken by other languages too.
//!
//! # A task
//!
//! Published to the default exchange (`""`) with routing key = the task's queue (the queue name,
//! prefixed with `<namespace>.` when a namespace is configured) and `mandatory` set, so that a
//! task without a queue is returned to its sender instead of dropped.
//!
//! | property | value |
//! |---|---|
//! | `message_id` | the task id (a UUID), stable across retries and replays |
//! | `content_type` | `application/x-bincode` (default) or `application/json` |
//! | `type` | `call` |
//! | `delivery_mode` | `2` (persistent) for `.delay()`, `1` for `.call()` |
//! | `expiration` | for `.call()`: milliseconds until its deadline |
//! | `reply_to`, `correlation_id` | for `.call()`: where and under which id to answer |
//! | `headers` | see below |
//!
//! | header | type | meaning |
//! |---|---|---|
//! | `task` | string | the task name; absent: the queue's only task (as aio-pika sends) |
//! | `wire` | integer | wire version; absent: `1` |
//! | `signature` | string | 16 hex digits fingerprinting argument and result types; absent: not checked |
//! | `attempt` | integer | incremented by retries; absent: 1 |
//! | `deadline` | integer | absolute deadline, Unix milliseconds; a worker does not start work past it |
//! | `eta` | integer | not before, Unix milliseconds |
//! | `root_id`, `parent_id` | string | task ids of the chain of tasks that caused this one; absent: this task is the root |
//! | `traceparent` | string | W3C trace context of the task that sent this one; absent: the worker starts a trace |
//!
//! Headers that would only repeat a default are left out: every header costs the sender, the
//! broker and the worker on every message. Integers may come in any AMQP integer type.
//! | `errors` | array of strings | the errors of earlier attempts (set by retries) |
//! | `redeliveries` | integer | how often the broker redelivered it (set by workers; see below) |
//! | `delay_bucket` | string | routes a delayed message to its bucket queue ([`topology`](crate::topology)) |
//!
//! The body holds the arguments: in bincode, the tuple of the arguments in order; in JSON, an
//! object keyed by parameter name (`{"a": 1, "b": 2}`). Unknown and missing keys are errors that
//! name the key; an `Option` argument may be left out.
//!
//! # A reply
//!
//! Published to the default exchange with routing key = `reply_to`, `correlation_id` copied from
//! the request, `content_type` of the request's codec (JSON when that codec is unknown), and
//! `type` = `result` or `error` (as aio-pika's RPC pattern does).
//!
//! - `result`: the body is the task's value.
//! - `error`: the body is `{"error": {"kind", "type", "message", "args", "value"}}` in the
//!   reply's codec (in bincode: those five fields in that order, `args` a list of strings and
//!   `value` an option): `kind` is machine-readable ([`ErrorKind`]), `type` the error's type
//!   name, `message` a human sentence, `args` = `[message]` (what aio-pika expects), `value` the
//!   task's typed error value for `kind` = `task`.
//!
//! # A dead letter
//!
//! A message a worker cannot or must not run is republished, persistent, to `<queue>.dlq` with the
//! original properties (minus `expiration`) and headers, plus `dead_reason` (an [`ErrorKind`]),
//! `dead_error` (the message), `dead_queue` and `dead_at` (Unix milliseconds); only after its
//! publisher confirm is the original acked.
//!
//! # Redeliveries
//!
//! A message that kills its worker every time (abort, stack overflow, out of memory) comes back
//! with the `redelivered` flag. A worker receiving such a message from a classic queue does not
//! run it: it republishes a copy with `redeliveries` incremented and acks the original, so the
//! count survives the next crash; past the limit (`--max-redeliveries`, default 5) the message is
//! dead-lettered as `too_many_redeliveries`. Quorum queues count for themselves
//! (`x-delivery-count`). Tasks returned to the queue by a graceful shutdown count too.
//!
//! # Speaking with aio-pika's `JsonRPC`
//!
//! Python services on aio-pika's `patterns.JsonRPC` and amqp-tasks call each other both ways,
//! verified against aio-pika 10.2.1 (`tests/tests/python.rs`). A JSON task is an aio-pika call
//! and an aio-pika call is a JSON task; replies have the same shape on both sides.
//!
//! | | aio-pika `JsonRPC.call` sends | amqp-tasks `.call()` sends |
//! |---|---|---|
//! | exchange, routing key | `""`, the method name | `""`, the task queue |
//! | `mandatory` | yes | yes |
//! | `content_type` | `application/json` | `application/json` with `codec = "json"` (bincode by default) |
//! | `type` | `call` | `call` |
//! | `correlation_id` | a UUID | a number, unique per connection |
//! | `reply_to` | its result queue | its reply queue |
//! | `message_id` | random hex (the task id here) | the task id |
//! | `delivery_mode` | `1` | `1` |
//! | `expiration` | only when `expiration=` is given (seconds there) | milliseconds until the deadline |
//! | `priority` | `5` (or `priority=`) | not set |
//! | headers | `From` = its result queue | those above; aio-pika ignores them |
//! | body | the kwargs as a JSON object | the arguments as a JSON object keyed by name |
//!
//! Both answer with the request's `correlation_id`, `content_type` `application/json` and `type`
//! `result` (body: the value) or `error`. An error body is `{"error": {"type", "message",
//! "args"}}` from aio-pika (`type` the exception's class, `message` its `repr`, `args` its
//! arguments) and the same plus `kind` and `value` from a worker here.
//!
//! **Python calls a task** (`await rpc.call("add", kwargs={"a": 1, "b": 2})`): the worker runs
//! the only task of the queue (aio-pika sends no `task` header), checks the JSON arguments by name
//! and answers. `rpc.call` returns the value, or raises `JsonRPCError("RPC exception", body)` for
//! an error reply: a task's own error (`kind` `task`, `type` its Rust type, `value` the error), bad
//! arguments (`kind` `bad_payload`, the message names the argument), a panic, and so on; for
//! these framework errors `type` is the kind in CamelCase (`BadPayload`, `Panicked`, ...). A call
//! to a queue that does not exist is
//! returned (`mandatory`) and raises `MessageProcessError` at once.
//!
//! **Rust calls a Python function** registered with `JsonRPC.register("multiply", multiply)`
//! through a declaration-only stub, `#[task(name = "multiply", codec = "json")] async fn
//! multiply(x: i64, y: i64) -> i64;`. aio-pika calls `multiply(**body)` and answers; a Python
//! exception is [`CallError::Remote`](crate::CallError::Remote) with `kind` = its class name and
//! `message` = its `repr`. An error body that also has `"kind": "task"` and a `value` (a
//! `JsonRPC` subclass can add them in `serialize_exception`) is the stub's typed
//! [`CallError::Task`](crate::CallError::Task). The client declares no queue but its own reply
//! queue, so aio-pika's queues (declared with `x-dead-letter-exchange` = `rpc.dlx`) and its
//! `rpc.dlx` exchange are never declared with other arguments; with no function registered, the
//! call is a [`NoRoute`](crate::CallError::NoRoute) error at once.
//!
//! What does not match:
//!
//! - **Expired calls in a task queue.** aio-pika declares its queues with `rpc.dlx` as dead-letter
//!   exchange, which brings an expired call back to its caller (by the `From` header) as
//!   `asyncio.TimeoutError`. Task queues have no dead-letter exchange (their arguments are
//!   frozen), so a Python call with `expiration=` that expires before a worker takes it is
//!   dropped, and `rpc.call` waits on: bound it with `asyncio.wait_for`, or give the task queues
//!   aio-pika's behaviour with a policy, which changes no queue argument:
//!   `rabbitmqctl set_policy rpc-dlx '^myapp\.' '{"dead-letter-exchange": "rpc.dlx"}' --apply-to
//!   queues`. (A Rust call needs neither: its own deadline ends it with
//!   [`Timeout`](crate::CallError::Timeout), whatever happens to the message.)
//! - **Priorities** are ignored: task queues have no `x-max-priority`.
//! - **Bincode**, the default codec, is not JSON: aio-pika fails to decode it (a `Remote` decode
//!   error). Stubs of Python functions use `codec = "json"`.
//! - **Several tasks in one queue** (`queue = "..."`) cannot be told apart without the `task`
//!   header, which aio-pika does not send: such a call is answered `unknown_task`.
//! - **`JsonRPC.initialize(exchange=...)`** routes calls through a named exchange with routing key
//!   `<exchange>::<method>`; task queues are reached through the default exchange only.
//! - **The pickle-based `patterns.RPC`** is not compatible: a worker refuses
//!   `application/python-pickle` (answered `unsupported_content_type` and dead-lettered; aio-pika
//!   then fails to unpickle the JSON answer and raises `UnpicklingError`), and amqp-tasks does not
//!   write pickles.

use crate::codec::{Codec, CodecError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The wire version in the `wire` header.
pub const WIRE_VERSION: i64 = 1;

/// `type` of a task message.
pub const TYPE_CALL: &str = "call";
/// `type` of a successful reply.
pub const TYPE_RESULT: &str = "result";
/// `type` of an error reply.
pub const TYPE_ERROR: &str = "error";

/// Header names.
pub mod header {
    /// The task name.
    pub const TASK: &str = "task";
    /// The wire version.
    pub const WIRE: &str = "wire";
    /// The signature fingerprint.
    pub const SIGNATURE: &str = "signature";
    /// The attempt number, from 1.
    pub const ATTEMPT: &str = "attempt";
    /// The absolute deadline, Unix milliseconds.
    pub const DEADLINE: &str = "deadline";
    /// Not before, Unix milliseconds.
    pub const ETA: &str = "eta";
    /// The id of the first task of the chain.
    pub const ROOT_ID: &str = "root_id";
    /// The id of the task that sent this one.
    pub const PARENT_ID: &str = "parent_id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// The errors of earlier attempts.
    pub const ERRORS: &str = "errors";
    /// How often the broker redelivered the message, as counted by workers.
    pub const REDELIVERIES: &str = "redeliveries";
    /// Set by quorum queues: how often the message was delivered before.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Dead letters: why ([`ErrorKind`](super::ErrorKind)).
    pub const DEAD_REASON: &str = "dead_reason";
    /// Dead letters: the error message.
    pub const DEAD_ERROR: &str = "dead_error";
    /// Dead letters: the queue the message came from.
    pub const DEAD_QUEUE: &str = "dead_queue";
    /// Dead letters: when, Unix milliseconds.
    pub const DEAD_AT: &str = "dead_at";
}

/// Machine-readable kinds of error replies and dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The task returned its own error.
    Task,
    /// No task of that name is served here.
    UnknownTask,
    /// The arguments could not be decoded.
    BadPayload,
    /// The sender's signature fingerprint differs from the worker's.
    SignatureMismatch,
    /// The handler panicked.
    Panicked,
    /// The handler ran past its time limit.
    TimeLimit,
    /// The deadline passed before the task could start.
    Deadline,
    /// The `content_type` is not a supported codec.
    UnsupportedContentType,
    /// The body is larger than the worker accepts.
    TooLarge,
    /// The task succeeded but its result could not be encoded.
    BadResult,
    /// The message was redelivered too often: it probably kills its worker.
    TooManyRedeliveries,
}

impl ErrorKind {
    /// The name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Task => "task",
            ErrorKind::UnknownTask => "unknown_task",
            ErrorKind::BadPayload => "bad_payload",
            ErrorKind::SignatureMismatch => "signature_mismatch",
            ErrorKind::Panicked => "panicked",
            ErrorKind::TimeLimit => "time_limit",
            ErrorKind::Deadline => "deadline",
            ErrorKind::UnsupportedContentType => "unsupported_content_type",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::BadResult => "bad_result",
            ErrorKind::TooManyRedeliveries => "too_many_redeliveries",
        }
    }

    /// The name as an exception type, for an error reply's `type`: `bad_payload` → `BadPayload`.
    pub fn type_name(self) -> String {
        self.as_str()
            .split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect()
    }

    /// The kind of a wire name.
    pub fn parse(name: &str) -> Option<ErrorKind> {
        const ALL: [ErrorKind; 11] = [
            ErrorKind::Task,
            ErrorKind::UnknownTask,
            ErrorKind::BadPayload,
            ErrorKind::SignatureMismatch,
            ErrorKind::Panicked,
            ErrorKind::TimeLimit,
            ErrorKind::Deadline,
            ErrorKind::UnsupportedContentType,
            ErrorKind::TooLarge,
            ErrorKind::BadResult,
            ErrorKind::TooManyRedeliveries,
        ];
        ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// The headers of a task message.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TaskHeaders<'a> {
    // Borrowed from the delivery where possible: read on every task, rarely kept.
    pub task: Option<Cow<'a, str>>,
    pub wire: Option<i64>,
    pub signature: Option<Cow<'a, str>>,
    pub attempt: u32,
    pub deadline_ms: Option<u64>,
    pub eta_ms: Option<u64>,
    pub root_id: Option<Cow<'a, str>>,
    pub parent_id: Option<Cow<'a, str>>,
    pub traceparent: Option<Cow<'a, str>>,
    pub errors: Vec<String>,
    pub redeliveries: u32,
    /// `x-delivery-count`, set by quorum queues (read only).
    pub delivery_count: Option<u32>,
}

impl<'a> TaskHeaders<'a> {
    #[cfg(test)]
    pub fn to_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        self.insert_into(&mut table);
        table
    }

    /// These headers over `original`'s, keeping any header this format does not define.
    pub fn write_into(&self, original: FieldTable) -> FieldTable {
        let mut map = original.inner().clone();
        for key in [
            header::TASK,
            header::WIRE,
            header::SIGNATURE,
            header::ATTEMPT,
            header::ROOT_ID,
            header::PARENT_ID,
            header::TRACEPARENT,
            header::DEADLINE,
            header::ETA,
            header::ERRORS,
            header::REDELIVERIES,
            crate::topology::DELAY_BUCKET_HEADER,
        ] {
            map.remove(key);
        }
        let mut table = FieldTable::from(map);
        self.insert_into(&mut table);
        table
    }

    fn insert_into(&self, table: &mut FieldTable) {
        HeaderFields {
            task: self.task.as_deref(),
            wire: self.wire,
            signature: self.signature.as_deref(),
            attempt: self.attempt,
            deadline_ms: self.deadline_ms,
            eta_ms: self.eta_ms,
            root_id: self.root_id.as_deref(),
            parent_id: self.parent_id.as_deref(),
            traceparent: self.traceparent.as_deref(),
            errors: &self.errors,
            redeliveries: self.redeliveries,
        }
        .insert_into(table);
    }

    /// Reads what it can; headers of the wrong type count as absent.
    pub fn from_table(table: Option<&'a FieldTable>) -> TaskHeaders<'a> {
        let mut headers = TaskHeaders {
            attempt: 1,
            ..TaskHeaders::default()
        };
        // One pass over the (few) headers present, rather than a lookup per known key.
        for (key, value) in table.into_iter().flatten() {
            let unsigned = || value_i64(value).and_then(|n| u64::try_from(n).ok());
            let small = || value_i64(value).and_then(|n| u32::try_from(n).ok());
            match key.as_str() {
                header::TASK => headers.task = value_str(value),
                header::WIRE => headers.wire = value_i64(value),
                header::SIGNATURE => headers.signature = value_str(value),
                header::ATTEMPT => headers.attempt = small().unwrap_or(1).max(1),
                header::DEADLINE => headers.deadline_ms = unsigned(),
                header::ETA => headers.eta_ms = unsigned(),
                header::ROOT_ID => headers.root_id = value_str(value),
                header::PARENT_ID => headers.parent_id = value_str(value),
                header::TRACEPARENT => headers.traceparent = value_str(value),
                header::ERRORS => {
                    if let AMQPValue::FieldArray(errors) = value {
                        headers.errors =
                            errors.as_slice().iter().filter_map(value_string).collect();
                    }
                }
                header::REDELIVERIES => headers.redeliveries = small().unwrap_or(0),
                header::DELIVERY_COUNT => headers.delivery_count = small(),
                _ => {}
            }
        }
        headers
    }
}

/// The headers of an outgoing task, borrowed: what a sender writes without copying its strings
/// first.
#[derive(Default)]
pub(crate) struct HeaderFields<'a> {
    pub task: Option<&'a str>,
    pub wire: Option<i64>,
    pub signature: Option<&'a str>,
    pub attempt: u32,
    pub deadline_ms: Option<u64>,
    pub eta_ms: Option<u64>,
    pub root_id: Option<&'a str>,
    pub parent_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    pub errors: &'a [String],
    pub redeliveries: u32,
}

impl HeaderFields<'_> {
    pub fn to_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        self.insert_into(&mut table);
        table
    }

    /// Every header costs the broker and both ends on every message: a default is left out.
    fn insert_into(&self, table: &mut FieldTable) {
        for (key, value) in [
            (header::TASK, self.task),
            (header::SIGNATURE, self.signature),
            (header::ROOT_ID, self.root_id),
            (header::PARENT_ID, self.parent_id),
            (header::TRACEPARENT, self.traceparent),
        ] {
            if let Some(value) = value {
                table.insert(key.into(), AMQPValue::LongString(value.into()));
            }
        }
        if let Some(wire) = self.wire.filter(|wire| *wire != WIRE_VERSION) {
            table.insert(header::WIRE.into(), AMQPValue::LongLongInt(wire));
        }
        if self.attempt > 1 {
            table.insert(header::ATTEMPT.into(), AMQPValue::LongUInt(self.attempt));
        }
        for (key, value) in [
            (header::DEADLINE, self.deadline_ms),
            (header::ETA, self.eta_ms),
        ] {
            if let Some(ms) = value {
                table.insert(
                    key.into(),
                    AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
                );
            }
        }
        if !self.errors.is_empty() {
            let errors: Vec<AMQPValue> = self
                .errors
                .iter()
                .map(|e| AMQPValue::LongString(e.as_str().into()))
                .collect();
            table.insert(header::ERRORS.into(), AMQPValue::FieldArray(errors.into()));
        }
        if self.redeliveries > 0 {
            table.insert(
                header::REDELIVERIES.into(),
                AMQPValue::LongUInt(self.redeliveries),
            );
        }
    }
}

/// A string header, borrowed when it is valid UTF-8.
pub(crate) fn value_str(value: &AMQPValue) -> Option<Cow<'_, str>> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(Cow::Borrowed(s.as_str())),
        _ => None,
    }
}

/// A string header, whichever AMQP string type carries it.
pub(crate) fn value_string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header, whichever AMQP integer type (or decimal string) carries it.
pub(crate) fn value_i64(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            value_string(value)?.trim().parse().ok()
        }
        _ => None,
    }
}

pub(crate) fn short(text: &str) -> ShortString {
    // ShortStrings are limited to 255 bytes; cut at a character boundary rather than panic.
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&text[..end])
}

/// The body of an `error` reply (see the [module documentation](self)).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorReply<E> {
    pub error: ErrorBody<E>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorBody<E> {
    pub kind: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub message: String,
    pub args: Vec<String>,
    pub value: Option<E>,
}

impl<E: Serialize> ErrorReply<E> {
    pub fn new(kind: ErrorKind, type_name: &str, message: String, value: Option<E>) -> Self {
        ErrorReply {
            error: ErrorBody {
                kind: kind.as_str().to_owned(),
                type_name: type_name.to_owned(),
                args: vec![message.clone()],
                message,
                value,
            },
        }
    }
}

/// An error reply as received: what every sender provides, and the typed value when decodable.
#[derive(Debug)]
pub(crate) struct ReceivedError<E> {
    pub kind: Option<String>,
    pub type_name: String,
    pub message: String,
    pub value: Option<E>,
}

/// Decodes an `error` reply. JSON is read leniently (a reply from aio-pika has no `kind` and no
/// `value`, and its `args` may hold anything).
pub(crate) fn decode_error<E: DeserializeOwned>(
    codec: Codec,
    body: &[u8],
) -> Result<ReceivedError<E>, CodecError> {
    match codec {
        Codec::Bincode => {
            let reply: ErrorReply<E> = codec.decode(body)?;
            Ok(ReceivedError {
                kind: Some(reply.error.kind),
                type_name: reply.error.type_name,
                message: reply.error.message,
                value: reply.error.value,
            })
        }
        Codec::Json => {
            let mut root: serde_json::Value = codec.decode(body)?;
            let error = root
                .get_mut("error")
                .filter(|e| e.is_object())
                .ok_or_else(|| CodecError::new("an error reply without an `error` object"))?;
            let text = |e: &serde_json::Value, key: &str| {
                e.get(key).and_then(|v| v.as_str()).map(str::to_owned)
            };
            let value = match error.get_mut("value").map(serde_json::Value::take) {
                Some(serde_json::Value::Null) | None => None,
                Some(value) => serde_json::from_value(value).ok(),
            };
            Ok(ReceivedError {
                kind: text(error, "kind"),
                type_name: text(error, "type").unwrap_or_default(),
                message: text(error, "message").unwrap_or_default(),
                value,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let headers = TaskHeaders {
            task: Some("math.div".into()),
            wire: Some(2),
            signature: Some("0123456789abcdef".into()),
            attempt: 2,
            deadline_ms: Some(1_700_000_000_000),
            eta_ms: None,
            root_id: Some("r".into()),
            parent_id: Some("p".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            errors: vec!["attempt 1: boom".into()],
            redeliveries: 2,
            delivery_count: None,
        };
        assert_eq!(TaskHeaders::from_table(Some(&headers.to_table())), headers);
        // Defaults are not written, and read back as defaults.
        let first = TaskHeaders {
            wire: Some(WIRE_VERSION),
            attempt: 1,
            ..TaskHeaders::default()
        };
        let table = first.to_table();
        assert!(table.inner().is_empty(), "{table:?}");
        assert_eq!(TaskHeaders::from_table(Some(&table)).attempt, 1);
    }

    #[test]
    fn rewriting_keeps_foreign_headers_and_drops_stale_ones() {
        let mut original = FieldTable::default();
        original.insert("x-custom".into(), AMQPValue::LongString("kept".into()));
        original.insert("eta".into(), AMQPValue::LongLongInt(5));
        original.insert("delay_bucket".into(), AMQPValue::LongString("800".into()));
        let rewritten = TaskHeaders {
            attempt: 2,
            ..TaskHeaders::default()
        }
        .write_into(original);
        let map = rewritten.inner();
        assert!(map.contains_key("x-custom"));
        assert!(!map.contains_key("eta") && !map.contains_key("delay_bucket"));
        assert_eq!(map.get("attempt"), Some(&AMQPValue::LongUInt(2)));
        let first = TaskHeaders {
            attempt: 1,
            ..TaskHeaders::default()
        }
        .to_table();
        assert!(
            !first.contains_key("attempt"),
            "a first attempt is the default"
        );
    }

    #[test]
    fn missing_or_foreign_headers_are_tolerated() {
        let none = TaskHeaders::from_table(None);
        assert_eq!(none.attempt, 1);
        let mut table = FieldTable::default();
        table.insert("attempt".into(), AMQPValue::LongString("3".into()));
        table.insert("deadline".into(), AMQPValue::Boolean(true));
        table.insert("task".into(), AMQPValue::ShortString("add".into()));
        let parsed = TaskHeaders::from_table(Some(&table));
        assert_eq!(
            (parsed.attempt, parsed.deadline_ms, parsed.task.as_deref()),
            (3, None, Some("add"))
        );
    }

    #[test]
    fn error_reply_json_shape_matches_aio_pika() {
        let reply = ErrorReply::new(
            ErrorKind::Task,
            "DivError",
            "division by zero".into(),
            Some("ByZero"),
        );
        let json: serde_json::Value =
            serde_json::from_slice(&Codec::Json.encode(&reply).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"kind": "task", "type": "DivError", "message": "division by zero",
                "args": ["division by zero"], "value": "ByZero"}})
        );
    }

    #[test]
    fn error_reply_decodes_in_both_codecs() {
        for codec in [Codec::Bincode, Codec::Json] {
            let reply = ErrorReply::new(ErrorKind::Panicked, "", "boom".into(), None::<()>);
            let received: ReceivedError<String> =
                decode_error(codec, &codec.encode(&reply).unwrap()).unwrap();
            assert_eq!(received.kind.as_deref(), Some("panicked"));
            assert_eq!(received.message, "boom");
            assert!(received.value.is_none());
        }
        let python = br#"{"error": {"type": "ZeroDivisionError", "message": "division by zero", "args": [1, null]}}"#;
        let received: ReceivedError<String> = decode_error(Codec::Json, python).unwrap();
        assert_eq!(
            (received.kind, received.type_name.as_str()),
            (None, "ZeroDivisionError")
        );
    }

    #[test]
    fn error_kinds_round_trip() {
        for name in [
            "task",
            "unknown_task",
            "bad_payload",
            "signature_mismatch",
            "panicked",
            "time_limit",
            "deadline",
            "unsupported_content_type",
            "too_large",
            "bad_result",
            "too_many_redeliveries",
        ] {
            assert_eq!(ErrorKind::parse(name).unwrap().as_str(), name);
            assert!(!ErrorKind::parse(name).unwrap().type_name().contains('_'));
        }
        assert_eq!(ErrorKind::parse("nope"), None);
        assert_eq!(ErrorKind::BadPayload.type_name(), "BadPayload");
    }
}
