//! Task headers: their names, and [`TaskHeaders`], the one type that reads them (borrowed from a
//! delivery, in one pass, tolerant of foreign types) and writes them (leaving defaults out).
//! Pure: no I/O, no knowledge of who sends or serves.

use super::WIRE_VERSION;
use super::topology::DELAY_BUCKET_HEADER;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::borrow::Cow;

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
    /// How often the message came back from running alone in a worker that died (counted by
    /// workers, in the redelivered lane).
    pub const REDELIVERIES: &str = "redeliveries";
    /// How often workers that do not serve the task passed it on to one that does.
    pub const PASSED_ON: &str = "passed_on";
    /// Set by quorum queues: how often the message was delivered before.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Dead letters: why ([`ErrorKind`](crate::wire::ErrorKind)).
    pub const DEAD_REASON: &str = "dead_reason";
    /// Dead letters: the error message.
    pub const DEAD_ERROR: &str = "dead_error";
    /// Dead letters: the queue the message came from.
    pub const DEAD_QUEUE: &str = "dead_queue";
    /// Dead letters: when, Unix milliseconds.
    pub const DEAD_AT: &str = "dead_at";
}

/// The headers of a task message.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TaskHeaders<'a> {
    // Borrowed from the delivery (or the sender's strings) where possible: read on every task,
    // rarely kept.
    pub(crate) task: Option<Cow<'a, str>>,
    pub(crate) wire: Option<i64>,
    pub(crate) signature: Option<Cow<'a, str>>,
    pub(crate) attempt: u32,
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) eta_ms: Option<u64>,
    pub(crate) root_id: Option<Cow<'a, str>>,
    pub(crate) parent_id: Option<Cow<'a, str>>,
    pub(crate) traceparent: Option<Cow<'a, str>>,
    pub(crate) errors: Vec<String>,
    pub(crate) redeliveries: u32,
    pub(crate) passed_on: u32,
    /// `x-delivery-count`, set by quorum queues: read, never trusted (it counts graceful returns
    /// too), and left out of every copy.
    pub(crate) delivery_count: Option<u32>,
    /// A protocol header present with a value of the wrong type (bad input, not absent).
    pub(crate) malformed: Option<&'static str>,
}

impl<'a> TaskHeaders<'a> {
    /// The headers as a table of their own (what a sender writes).
    pub(crate) fn to_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        self.insert_into(&mut table);
        table
    }

    /// These headers over `original`'s, keeping any header this format does not define.
    pub(crate) fn write_into(&self, original: FieldTable) -> FieldTable {
        let mut map = original.inner().clone();
        // A malformed `task` (refused before any copy is made) is kept as it came.
        if self.task.is_some() {
            map.remove(header::TASK);
        }
        for key in [
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
            header::PASSED_ON,
            header::DELIVERY_COUNT,
            super::topology::DELAY_BUCKET_HEADER,
        ] {
            map.remove(key);
        }
        let mut table = FieldTable::from(map);
        self.insert_into(&mut table);
        table
    }

    /// Every header costs the broker and both ends on every message: a default is left out.
    fn insert_into(&self, table: &mut FieldTable) {
        for (key, value) in [
            (header::TASK, &self.task),
            (header::SIGNATURE, &self.signature),
            (header::ROOT_ID, &self.root_id),
            (header::PARENT_ID, &self.parent_id),
            (header::TRACEPARENT, &self.traceparent),
        ] {
            if let Some(value) = value {
                table.insert(key.into(), AMQPValue::LongString(value.as_ref().into()));
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
        for (key, count) in [
            (header::REDELIVERIES, self.redeliveries),
            (header::PASSED_ON, self.passed_on),
        ] {
            if count > 0 {
                table.insert(key.into(), AMQPValue::LongUInt(count));
            }
        }
    }

    /// Reads what it can; headers of the wrong type count as absent.
    pub(crate) fn from_table(table: Option<&'a FieldTable>) -> TaskHeaders<'a> {
        let mut headers = TaskHeaders {
            attempt: 1,
            ..TaskHeaders::default()
        };
        // One pass over the (few) headers present, rather than a lookup per known key.
        for (key, value) in table.into_iter().flatten() {
            let unsigned = || value_i64(value).and_then(|n| u64::try_from(n).ok());
            // Counts from the wire are clamped into range, never wrapped or reset.
            let count = || value_i64(value).map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX));
            match key.as_str() {
                header::TASK => {
                    headers.task = value_str(value);
                    if headers.task.is_none() {
                        headers.malformed = Some(header::TASK);
                    }
                }
                header::WIRE => headers.wire = value_i64(value),
                header::SIGNATURE => headers.signature = value_str(value),
                header::ATTEMPT => headers.attempt = count().unwrap_or(1).max(1),
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
                header::REDELIVERIES => headers.redeliveries = count().unwrap_or(0),
                header::PASSED_ON => headers.passed_on = count().unwrap_or(0),
                header::DELIVERY_COUNT => headers.delivery_count = count(),
                _ => {}
            }
        }
        headers
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

// --- the header budget ---------------------------------------------------------------------
//
// RabbitMQ never splits a content-header frame: a message's properties and headers must fit one
// frame of the connection's negotiated `frame_max`. What the framework writes is kept within that
// (its own additions are capped, foreign headers copied from a received message are dropped if
// need be), and what it receives is checked against what leaves room for those additions.

/// Room kept in a content-header frame for the properties beside the headers (each short-string
/// property is at most 256 bytes) and the frame's own overhead.
const PROPERTIES_RESERVE: usize = 4 * 1024;
/// Room kept for the headers the framework adds to a message it copies (a dead letter's reason
/// and error, a retry's history, the delay bucket, ...).
const OWN_HEADERS_RESERVE: usize = 16 * 1024;
/// The longest `dead_error` written.
pub(crate) const DEAD_ERROR_MAX: usize = 2 * 1024;
/// The longest entry of a retry's `errors` history.
pub(crate) const ERROR_ENTRY_MAX: usize = 1024;
/// The most bytes of `errors` history kept (the oldest entries go first).
pub(crate) const ERRORS_TOTAL_MAX: usize = 8 * 1024;
/// Names the headers dropped from a copy to make it fit.
pub(crate) const DROPPED_HEADERS: &str = "dropped_headers";

/// How many bytes of headers a connection can carry, from its negotiated `frame_max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeaderBudget {
    /// The most a published message's header table may take.
    pub(crate) write: usize,
    /// The most a received message's header table may take and still be copied (forwarded,
    /// dead-lettered) with the framework's additions.
    pub(crate) receive: usize,
}

impl HeaderBudget {
    pub(crate) fn for_frame_max(frame_max: u32) -> HeaderBudget {
        // 0 would mean "no limit": RabbitMQ never negotiates it, but stay finite.
        let frame = if frame_max == 0 {
            131_072
        } else {
            frame_max as usize
        };
        let write = frame.saturating_sub(PROPERTIES_RESERVE).max(1024);
        HeaderBudget {
            write,
            receive: write.saturating_sub(OWN_HEADERS_RESERVE).max(512),
        }
    }
}

/// The bytes a header table takes on the wire, as AMQP encodes it.
pub(crate) fn table_len(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(key, value)| 1 + key.as_str().len() + value_len(value))
        .sum::<usize>()
}

/// A value with its type tag.
fn value_len(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::FieldArray(array) => 4 + array.as_slice().iter().map(value_len).sum::<usize>(),
        AMQPValue::FieldTable(table) => table_len(table),
        AMQPValue::ByteArray(bytes) => 4 + bytes.as_slice().len(),
        AMQPValue::Void => 0,
    }
}

/// `text` cut to at most `max` bytes, at a character boundary, marked `…` where it was cut.
pub(crate) fn truncate(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// The headers this format defines (kept when a copy must shrink; cut only as a last resort).
fn is_protocol_header(key: &str) -> bool {
    matches!(
        key,
        header::TASK
            | header::WIRE
            | header::SIGNATURE
            | header::ATTEMPT
            | header::DEADLINE
            | header::ETA
            | header::ROOT_ID
            | header::PARENT_ID
            | header::TRACEPARENT
            | header::ERRORS
            | header::REDELIVERIES
            | header::PASSED_ON
            | header::DEAD_REASON
            | header::DEAD_ERROR
            | header::DEAD_QUEUE
            | header::DEAD_AT
            | DELAY_BUCKET_HEADER
            | DROPPED_HEADERS
    )
}

/// `table` made to fit `budget` bytes: first the largest headers this format does not define are
/// dropped (and named in `dropped_headers`), then, if that is not enough, the protocol's own
/// strings are cut. A table that fits is returned as it is.
pub(crate) fn fit(table: FieldTable, budget: usize) -> FieldTable {
    if table_len(&table) <= budget {
        return table;
    }
    let mut map = table.inner().clone();
    let mut foreign: Vec<(usize, String)> = map
        .iter()
        .filter(|(key, _)| !is_protocol_header(key.as_str()))
        .map(|(key, value)| (1 + key.as_str().len() + value_len(value), key.to_string()))
        .collect();
    foreign.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    let mut dropped = Vec::new();
    for (_, key) in foreign {
        if table_len(&FieldTable::from(map.clone())) <= budget {
            break;
        }
        map.remove(key.as_str());
        dropped.push(key);
    }
    if !dropped.is_empty() {
        let names = dropped.join(",");
        map.insert(
            DROPPED_HEADERS.into(),
            AMQPValue::LongString(truncate(&names, 1024).as_ref().into()),
        );
    }
    // Still too large: the protocol's own strings (a hostile task name, say) are cut, longest
    // first, then whatever is left of the largest values.
    let mut table = FieldTable::from(map);
    while table_len(&table) > budget {
        let Some((key, _)) = table
            .inner()
            .iter()
            .map(|(key, value)| (key.clone(), value_len(value)))
            .max_by_key(|(_, len)| *len)
        else {
            break;
        };
        let mut map = table.inner().clone();
        match map.get(&key) {
            Some(AMQPValue::LongString(text)) if text.as_bytes().len() > 256 => {
                let cut = truncate(&String::from_utf8_lossy(text.as_bytes()), 256).into_owned();
                map.insert(key, AMQPValue::LongString(LongString::from(cut)));
            }
            _ => {
                map.remove(&key);
            }
        }
        table = FieldTable::from(map);
    }
    table
}

/// Appends an attempt's error to a retry's history, within [`ERROR_ENTRY_MAX`] per entry and
/// [`ERRORS_TOTAL_MAX`] in all (the oldest entries go first).
pub(crate) fn push_error(errors: &mut Vec<String>, entry: &str) {
    errors.push(truncate(entry, ERROR_ENTRY_MAX).into_owned());
    while errors.iter().map(String::len).sum::<usize>() > ERRORS_TOTAL_MAX && errors.len() > 1 {
        errors.remove(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_len_is_what_amqp_encodes() {
        let mut table = FieldTable::default();
        table.insert("task".into(), AMQPValue::LongString("add".into()));
        table.insert("attempt".into(), AMQPValue::LongUInt(2));
        table.insert(
            "errors".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("x".into())].into()),
        );
        let mut buffer = vec![0u8; 4096];
        let written = cookie_factory::gen_simple(
            amq_protocol_types::generation::gen_field_table(&table),
            std::io::Cursor::new(&mut buffer[..]),
        )
        .unwrap()
        .position();
        assert_eq!(table_len(&table), written as usize);
    }

    #[test]
    fn fit_drops_foreign_headers_first_and_names_them() {
        let mut table = FieldTable::default();
        table.insert("task".into(), AMQPValue::LongString("add".into()));
        table.insert(
            "x-big".into(),
            AMQPValue::LongString("b".repeat(5_000).into()),
        );
        table.insert("x-small".into(), AMQPValue::LongString("s".into()));
        let fitted = fit(table.clone(), 2_000);
        assert!(table_len(&fitted) <= 2_000);
        let map = fitted.inner();
        assert!(map.contains_key("task") && map.contains_key("x-small"));
        assert!(!map.contains_key("x-big"));
        assert_eq!(
            map.get(DROPPED_HEADERS),
            Some(&AMQPValue::LongString("x-big".into()))
        );
        assert_eq!(fit(table.clone(), 100_000), table, "what fits is untouched");
        // A hostile task name: cut, not dropped.
        let mut hostile = FieldTable::default();
        hostile.insert(
            "task".into(),
            AMQPValue::LongString("t".repeat(40_000).into()),
        );
        let fitted = fit(hostile, 1_000);
        assert!(table_len(&fitted) <= 1_000);
        assert!(fitted.inner().contains_key("task"));
    }

    #[test]
    fn own_additions_are_capped() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(100);
        let cut = truncate(&long, 11);
        assert!(cut.len() <= 11 && cut.ends_with('…'), "{cut}");
        let mut errors = Vec::new();
        for i in 0..100 {
            push_error(&mut errors, &format!("attempt {i}: {}", "e".repeat(5_000)));
        }
        assert!(errors.iter().map(String::len).sum::<usize>() <= ERRORS_TOTAL_MAX);
        assert!(errors.last().unwrap().starts_with("attempt 99"));
        let budget = HeaderBudget::for_frame_max(131_072);
        assert!(budget.receive + OWN_HEADERS_RESERVE <= budget.write);
        assert!(budget.write + PROPERTIES_RESERVE <= 131_072);
    }

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
            passed_on: 3,
            delivery_count: None,
            malformed: None,
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
        // Forged numbers are clamped, never wrapped; a task name that is not a string is bad
        // input, not an absent name.
        let mut forged = FieldTable::default();
        forged.insert("attempt".into(), AMQPValue::LongLongInt(i64::MAX));
        forged.insert("redeliveries".into(), AMQPValue::LongLongInt(4_294_967_295));
        forged.insert("x-delivery-count".into(), AMQPValue::LongLongInt(-3));
        forged.insert("task".into(), AMQPValue::LongInt(7));
        let parsed = TaskHeaders::from_table(Some(&forged));
        assert_eq!((parsed.attempt, parsed.redeliveries), (u32::MAX, u32::MAX));
        assert_eq!(parsed.delivery_count, Some(0));
        assert_eq!((parsed.task, parsed.malformed), (None, Some("task")));
    }
}
