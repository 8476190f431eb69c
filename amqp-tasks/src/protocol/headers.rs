//! Task headers: their names, and [`TaskHeaders`], the one type that reads them (borrowed from a
//! delivery, in one pass, tolerant of foreign types) and writes them (leaving defaults out).
//! Pure: no I/O, no knowledge of who sends or serves.

use super::WIRE_VERSION;
use lapin::types::{AMQPValue, FieldTable};
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
    /// How often the broker redelivered the message, as counted by workers.
    pub const REDELIVERIES: &str = "redeliveries";
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
    /// `x-delivery-count`, set by quorum queues (read only).
    pub(crate) delivery_count: Option<u32>,
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
        if self.redeliveries > 0 {
            table.insert(
                header::REDELIVERIES.into(),
                AMQPValue::LongUInt(self.redeliveries),
            );
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
}
