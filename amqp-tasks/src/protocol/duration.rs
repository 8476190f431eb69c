//! Durations as people write them, one syntax everywhere: the `#[task]` attribute's `timeout` and
//! `backoff` and every command-line option (`--grace`, `--timeout`) read `500ms`, `30s`, `2m`,
//! `1h 30m` ([humantime]'s syntax, which the macro crate uses too) or a bare number of seconds.
//! Pure.

use std::time::Duration;

/// Parses `500ms`, `30s`, `2m`, `1h 30m`, or a bare number of seconds.
#[cfg_attr(not(any(feature = "cli", test)), allow(dead_code))]
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let invalid = || format!("`{text}` is not a duration such as 500ms, 30s, 2m or 1h");
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map(Duration::from_secs).map_err(|_| invalid());
    }
    humantime::parse_duration(text).map_err(|_| invalid())
}

/// `30s`, `1500ms`: how logs and listings show a duration.
pub(crate) fn human(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Task;

    /// The attribute reads durations as the command line does.
    #[amqp_tasks::task(timeout = "1h 30m", backoff = "250ms")]
    async fn long_running() {}

    #[amqp_tasks::task(timeout = 45)]
    async fn in_seconds() {}

    #[test]
    fn the_attribute_and_the_command_line_share_one_syntax() {
        assert_eq!(Ok(long_running::TIMEOUT), parse("1h 30m"));
        assert_eq!(Ok(long_running::BACKOFF), parse("250ms"));
        assert_eq!(Ok(in_seconds::TIMEOUT), parse("45"));
    }

    #[test]
    fn reads_units_and_bare_seconds() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5_400)));
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
        assert!(parse("99999999999999999999999").is_err());
        assert_eq!(human(Duration::from_millis(1_500)), "1500ms");
        assert_eq!(human(Duration::from_secs(30)), "30s");
    }
}
