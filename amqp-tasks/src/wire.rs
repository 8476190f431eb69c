//! The wire format: what a task and its reply look like on the broker. It is stable and meant to
//! be spoken by other languages too. (The code that reads and writes it is the crate's private
//! `protocol` layer; this module documents it and names its constants.)
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
//! | `errors` | array of strings | the errors of earlier attempts (set by retries) |
//! | `redeliveries` | integer | how often it came back from running alone in a worker that went away (set by workers; see below) |
//! | `passed_on` | integer | how often workers that do not serve the task passed it on to one that does |
//! | `delay_bucket` | string | routes a delayed message to its bucket queue ([`topology`](crate::topology)) |
//!
//! Headers that would only repeat a default are left out: every header costs the sender, the
//! broker and the worker on every message. Integers may come in any AMQP integer type.
//!
//! The `signature` fingerprint hashes the argument and result types as written in the task's
//! signature, module paths dropped ([`Signature`](crate::Signature) says exactly how); a worker
//! also accepts the fingerprint of earlier releases where it differs.
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
//! with the `redelivered` flag, and so do the messages that were merely prefetched by the worker it
//! killed. A worker never runs a redelivered message in its task queue: it moves it (a copy, then
//! the original's ack) to the queue's redelivered lane, `<queue>.redelivered`, uncounted. The lane
//! is consumed one message at a time, and each runs alone in its worker (no other task of the
//! worker runs meanwhile). A message that comes back redelivered *from the lane* was the one
//! running alone when its worker went away: only then is `redeliveries` incremented (in a copy,
//! so that the count survives the next crash), and once it reaches `--max-redeliveries` (default
//! 5) the message is dead-lettered as `too_many_redeliveries`. Innocent neighbours of a poison
//! message therefore run (alone, once); only the poison is blamed. A graceful shutdown gives the
//! deliveries it did not finish back as fresh copies, which count nothing. The broker's own
//! `x-delivery-count` (quorum queues) counts graceful returns too: it is never trusted, and left
//! out of every copy.
//!
//! # Header budget
//!
//! RabbitMQ never splits a content-header frame, so a message's properties and headers must fit
//! one frame of the negotiated `frame_max`. A connection asks for 128 KiB (RabbitMQ's default), so
//! that it can read any message the broker accepted; a smaller `?frame_max=` in the URL gives that
//! up (such a message then fails the whole connection, which the worker opens again). What a worker
//! writes stays within the frame: `dead_error` is cut to 2 KiB, the `errors` history to 8 KiB (the
//! oldest first), and a copy that would not fit drops the largest headers this format does not
//! define (naming them in `dropped_headers`). A received message whose headers leave no room for
//! those additions (over 108 KiB with 128 KiB frames) is refused as `too_large`.
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

pub use crate::protocol::headers::header;
pub use crate::protocol::reply::ErrorKind;
pub use crate::protocol::{TYPE_CALL, TYPE_ERROR, TYPE_RESULT, WIRE_VERSION};
