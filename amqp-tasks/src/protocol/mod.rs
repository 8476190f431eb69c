//! The protocol layer: what tasks, replies and dead letters look like on the broker, as pure data
//! and arithmetic. It owns the headers (read borrowed from a delivery, written within a budget),
//! the reply format and its mapping to [`CallError`](crate::CallError), the dead-letter headers,
//! the topology (queue names and arguments), the codecs, signatures, trace ids, durations and
//! the one retry policy.
//!
//! It must not do I/O, hold state or know about sessions, clients or workers: every layer above
//! (transport, client, worker) builds on it, and it depends on none of them. The public face of
//! the wire format is [`crate::wire`].

pub mod codec;
pub(crate) mod dead_letter;
pub(crate) mod duration;
pub(crate) mod headers;
pub(crate) mod json_args;
pub(crate) mod properties;
pub(crate) mod reply;
pub(crate) mod retry;
pub(crate) mod signature;
pub mod topology;
pub(crate) mod trace;

use lapin::types::ShortString;
use std::time::{SystemTime, UNIX_EPOCH};

/// The wire version in the `wire` header.
pub const WIRE_VERSION: i64 = 1;

/// `type` of a task message.
pub const TYPE_CALL: &str = "call";
/// `type` of a successful reply.
pub const TYPE_RESULT: &str = "result";
/// `type` of an error reply.
pub const TYPE_ERROR: &str = "error";

/// Milliseconds since the Unix epoch (0 before it, `u64::MAX` past what fits).
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An AMQP short string (at most 255 bytes), cut at a character boundary rather than panicking.
pub(crate) fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&text[..end])
}
