//! The protocol layer: what tasks, replies and dead letters look like on the broker, as pure data
//! and arithmetic. It owns the headers (read borrowed from a delivery, written within a budget),
//! the reply format and its mapping to [`CallError`](crate::CallError), the dead-letter headers,
//! the topology (queue names and arguments), the codecs, signatures, trace ids, durations, the
//! schedules of periodic tasks, the one retry policy and the one vocabulary of outcomes.
//!
//! It must not do I/O, hold state or know about sessions, clients or workers: every layer above
//! (transport, client, worker) builds on it, and it depends on none of them. The public face of
//! the wire format is [`crate::wire`].

pub mod codec;
pub(crate) mod control;
pub(crate) mod dead_letter;
pub(crate) mod duration;
pub(crate) mod event;
pub(crate) mod headers;
pub(crate) mod json_args;
pub(crate) mod outcome;
pub(crate) mod properties;
pub(crate) mod reply;
pub(crate) mod retry;
pub mod schedule;
pub(crate) mod signature;
pub mod topology;
pub(crate) mod trace;

use lapin::types::ShortString;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wire version in the `wire` header.
pub const WIRE_VERSION: i64 = 1;

/// `type` of a task message.
pub const TYPE_CALL: &str = "call";
/// `type` of a successful reply.
pub const TYPE_RESULT: &str = "result";
/// `type` of an error reply.
pub const TYPE_ERROR: &str = "error";

/// RabbitMQ refuses a message `expiration` above 2³² − 1 ms (about 49.7 days): it closes the
/// publishing channel. Every expiration the framework writes is clamped to it.
pub(crate) const MAX_EXPIRATION_MS: u64 = u32::MAX as u64;

/// The longest call deadline and retry delay the framework computes with (longer ones are clamped
/// to it): what an expiration can express.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(MAX_EXPIRATION_MS);

/// How far ahead a countdown or eta may be: longer ones are clamped (the delay queues hold any
/// length; this only keeps the arithmetic in range).
pub(crate) const MAX_ETA_AHEAD: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// An `expiration` property of `ms` milliseconds, within what the broker accepts.
pub(crate) fn expiration(ms: u64) -> ShortString {
    ShortString::from(ms.clamp(1, MAX_EXPIRATION_MS).to_string())
}

/// `now + delay`, with `delay` clamped to `limit` (never an overflow).
pub(crate) fn later(now: SystemTime, delay: Duration, limit: Duration) -> SystemTime {
    now.checked_add(delay.min(limit)).unwrap_or(now)
}

/// Milliseconds since the Unix epoch (0 before it, `u64::MAX` past what fits).
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The most bytes an AMQP short string (a routing key, a task id, a correlation id) may hold.
pub(crate) const SHORT_MAX: usize = 255;

/// An AMQP short string for text known to fit (checked by the caller, or the crate's own);
/// cut at a character boundary rather than panicking if it does not.
pub(crate) fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&text[..end])
}
