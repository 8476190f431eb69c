//! How the worker binary's log formats fields: as `tracing-subscriber`'s default does, with a
//! shorter path for the fields every task's span carries.
//!
//! `fmt` formats a span's fields when the span is made, whether or not anything is ever logged
//! inside it, and its default formatter sends every field, even a plain string or a number,
//! through `Debug` and its styling code. With one `task` span per task, that was an eighth of a
//! worker's instructions per task (callgrind). Here a plain string (nothing `Debug` would escape)
//! or a number is written directly, in the same text as the default, and a record's fields reach
//! `fmt`'s string in one piece; anything else, a message, and all fields of a terminal with
//! colours go to the default formatter unchanged.

use std::fmt;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};

/// The worker binary's field formatter (see the module's comment).
#[derive(Debug, Default)]
pub(crate) struct LogFields;

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        // Written into this thread's buffer first, then into `fmt`'s string in one piece: that
        // string starts empty for every span, and growing it a field at a time reallocated it
        // several times per span. (A field whose `Debug` logs gets a buffer of its own.)
        SCRATCH.with(|scratch| {
            let mut own = String::new();
            let mut borrowed = scratch.try_borrow_mut();
            let buffer = match &mut borrowed {
                Ok(scratch) => &mut **scratch,
                Err(_) => &mut own,
            };
            buffer.clear();
            format_plain(buffer, fields)?;
            let written = writer.write_str(buffer);
            if buffer.capacity() > SCRATCH_KEPT {
                *buffer = String::new();
            }
            written
        })
    }
}

/// The largest buffer a thread keeps between two log records.
const SCRATCH_KEPT: usize = 4096;

thread_local! {
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn format_plain<R: RecordFields>(buffer: &mut String, fields: R) -> fmt::Result {
    let mut visitor = PlainVisitor {
        writer: Writer::new(buffer),
        is_empty: true,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    fn pad(&mut self) -> fmt::Result {
        if self.is_empty {
            self.is_empty = false;
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    /// A field the default formatter writes: it pads and styles it as it always does.
    fn default_field(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        self.is_empty = false;
    }

    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        if self.result.is_err() {
            return;
        }
        if is_plain_name(field.name()) {
            self.result = self
                .pad()
                .and_then(|()| write!(self.writer, "{}={value}", field.name()));
        } else {
            self.default_field(|v| v.record_debug(field, &format_args!("{value}")));
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if is_plain_name(field.name()) && debug_is_quoted(value) {
            // What `{:?}` of this string writes: it in quotes.
            self.result = self.pad().and_then(|()| {
                self.writer.write_str(field.name())?;
                self.writer.write_str("=\"")?;
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            });
        } else {
            self.default_field(|v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_ok() {
            self.default_field(|v| v.record_error(field, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.default_field(|v| v.record_debug(field, value));
        }
    }
}

/// A field name the default formatter writes as it is (`message` and raw identifiers it treats
/// on their own).
fn is_plain_name(name: &str) -> bool {
    name != "message" && !name.starts_with("r#")
}

/// Whether `{:?}` writes this string as itself in quotes: printable ASCII without `"` and `\`.
fn debug_is_quoted(value: &str) -> bool {
    // A fold without an early exit, so that the compiler checks many bytes at a time.
    value.bytes().fold(true, |plain, b| {
        plain & (b.wrapping_sub(b' ') < 95) & (b != b'"') & (b != b'\\')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// What a log line inside a span reads, with the default formatter or this one.
    fn line(plain: bool) -> String {
        let captured = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false);
        let emit = || {
            let span = tracing::info_span!(
                "task",
                name = "add",
                id = "0a1b-2c3d",
                attempt = 2u32,
                delta = -3i64,
                ok = true,
                quoted = "say \"hi\"\n",
                unicode = "größe",
                shown = %"display",
                r#type = "raw",
                none = Option::<&str>::None,
            );
            span.record("none", "later");
            let error = std::io::Error::other("broken");
            span.in_scope(|| {
                tracing::info!(
                    count = 7u64,
                    text = "plain",
                    error = &error as &dyn std::error::Error,
                    "hello {}",
                    "world"
                )
            });
        };
        if plain {
            tracing::subscriber::with_default(builder.fmt_fields(LogFields).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn writes_what_the_default_formatter_writes() {
        let expected = line(false);
        assert!(
            expected.contains(r#"name="add" id="0a1b-2c3d" attempt=2"#),
            "{expected}"
        );
        assert_eq!(line(true), expected);
    }

    #[test]
    fn only_printable_ascii_without_quotes_or_backslashes_is_written_directly() {
        assert!(debug_is_quoted("0a1b-2c3d add_one ~"));
        for escaped in ["a\"b", "a\\b", "line\n", "tab\t", "größe", "\u{7f}"] {
            assert!(!debug_is_quoted(escaped), "{escaped:?}");
        }
    }
}
