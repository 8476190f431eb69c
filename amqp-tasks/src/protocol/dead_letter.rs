//! Dead letters: the headers a worker adds to a message it dead-letters (`dead_reason`,
//! `dead_error`, `dead_queue`, `dead_at`), reading them back into a [`DeadLetter`], and the
//! message a replay publishes. Written and read here only; pure (the worker and the `dlq` tools
//! do the I/O).

use super::codec::Codec;
use super::headers::{TaskHeaders, header, value_i64, value_string};
use super::properties::copy_properties;
use super::reply::ErrorKind;
use super::{TYPE_CALL, unix_ms};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use std::time::SystemTime;

/// The properties of the dead letter of a message: the original's (minus `expiration`),
/// persistent, with the original headers plus why, where from and when.
pub(crate) fn dead_letter_properties(
    original: &BasicProperties,
    reason: ErrorKind,
    error: &str,
    queue: &str,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        header::DEAD_REASON.into(),
        AMQPValue::LongString(reason.as_str().into()),
    );
    headers.insert(
        header::DEAD_ERROR.into(),
        AMQPValue::LongString(error.into()),
    );
    headers.insert(
        header::DEAD_QUEUE.into(),
        AMQPValue::LongString(queue.into()),
    );
    headers.insert(
        header::DEAD_AT.into(),
        AMQPValue::LongLongInt(i64::try_from(unix_ms(SystemTime::now())).unwrap_or(i64::MAX)),
    );
    copy_properties(original)
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// A dead-lettered task, as listed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The task id (`message_id`).
    pub id: String,
    /// The task name.
    pub task: String,
    /// Why it was dead-lettered (an [`ErrorKind`](crate::wire::ErrorKind) name).
    pub reason: String,
    /// The error message.
    pub error: String,
    /// When, Unix milliseconds.
    pub dead_at: Option<u64>,
    /// The attempt that failed last.
    pub attempt: u32,
    /// The errors of the attempts before it.
    pub history: Vec<String>,
    /// The body's codec and size, and the body itself when it is JSON.
    pub body: String,
}

/// The message as it goes back: same id, body and codec, a first attempt, nobody waiting.
pub(crate) fn fresh(queue: &str, original: &BasicProperties) -> (String, BasicProperties) {
    let table = original.headers().clone().unwrap_or_default();
    let target = table
        .inner()
        .get(header::DEAD_QUEUE)
        .and_then(value_string)
        .unwrap_or_else(|| queue.to_owned());
    let mut headers = TaskHeaders::from_table(Some(&table));
    headers.attempt = 1;
    headers.deadline_ms = None;
    headers.eta_ms = None;
    headers.errors.clear();
    headers.redeliveries = 0;
    let mut map = headers.write_into(table.clone()).inner().clone();
    for key in [
        header::DEAD_REASON,
        header::DEAD_ERROR,
        header::DEAD_QUEUE,
        header::DEAD_AT,
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        header::DELIVERY_COUNT,
    ] {
        map.remove(key);
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_type(TYPE_CALL.into())
        .with_headers(FieldTable::from(map));
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    (target, properties)
}

pub(crate) fn describe(properties: &BasicProperties, data: &[u8]) -> DeadLetter {
    let table = properties.headers().clone().unwrap_or_default();
    let text = |key: &str| {
        table
            .inner()
            .get(key)
            .and_then(value_string)
            .unwrap_or_default()
    };
    let headers = TaskHeaders::from_table(Some(&table));
    let codec = properties
        .content_type()
        .as_ref()
        .and_then(|c| Codec::from_content_type(c.as_str()));
    let body = match codec {
        Some(Codec::Json) => format!(
            "json {}",
            String::from_utf8_lossy(&data[..data.len().min(200)])
        ),
        Some(Codec::Bincode) => format!("bincode, {} bytes", data.len()),
        None => format!(
            "{} bytes of `{}`",
            data.len(),
            properties
                .content_type()
                .as_ref()
                .map_or("(no content type)", |c| c.as_str())
        ),
    };
    DeadLetter {
        id: properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        task: headers.task.as_deref().unwrap_or_default().to_owned(),
        reason: text(header::DEAD_REASON),
        error: text(header::DEAD_ERROR),
        dead_at: table
            .inner()
            .get(header::DEAD_AT)
            .and_then(value_i64)
            .and_then(|ms| u64::try_from(ms).ok()),
        attempt: headers.attempt,
        history: headers.errors,
        body,
    }
}

impl std::fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = self
            .dead_at
            .map(|at| {
                let ago = unix_ms(SystemTime::now()).saturating_sub(at) / 1000;
                format!(
                    " ({}h{:02}m{:02}s ago)",
                    ago / 3600,
                    ago / 60 % 60,
                    ago % 60
                )
            })
            .unwrap_or_default();
        // What a dead letter says came from the wire: shown with its control characters escaped,
        // so that it cannot move the cursor or rewrite the terminal of whoever lists it.
        writeln!(
            f,
            "{} task `{}` attempt {}: {}{age}",
            escaped(&self.id),
            escaped(&self.task),
            self.attempt,
            escaped(&self.reason)
        )?;
        writeln!(f, "    error: {}", escaped(&self.error))?;
        for earlier in &self.history {
            writeln!(f, "    before: {}", escaped(earlier))?;
        }
        write!(f, "    body: {}", escaped(&self.body))
    }
}

/// `text` with its control characters escaped (`\u{1b}`, `\n`, ...).
fn escaped(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_escape_control_characters() {
        let letter = DeadLetter {
            id: "id".into(),
            task: "add\u{1b}[2J".into(),
            reason: "bad_payload".into(),
            error: "line\nbreak".into(),
            dead_at: None,
            attempt: 1,
            history: vec!["\u{7}bell".into()],
            body: "json {}".into(),
        };
        let shown = letter.to_string();
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{shown:?}"
        );
        assert!(
            shown.contains("add\\u{1b}[2J") && shown.contains("line\\nbreak"),
            "{shown}"
        );
    }
}
