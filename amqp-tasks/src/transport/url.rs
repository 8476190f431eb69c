//! Broker URLs: parsing what lapin takes (with this crate's default `frame_max`), and redacting
//! passwords for logs and errors. Pure; the session connects with the result.

use lapin::uri::AMQPUri;

/// The largest AMQP frame a connection asks for unless its URL says otherwise (`?frame_max=`):
/// larger bodies travel in several frames; the connection's buffers stay small.
pub(crate) const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Parses a broker URL for lapin; the error never repeats the URL (it may hold a password).
pub(crate) fn parse(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|error: String| format!("invalid broker URL: {error}"))?;
    // lapin keeps 32 frames of buffer per direction and connection, zero-filled: with
    // RabbitMQ's 128 KiB frames that is 8 MiB per connection, most of an idle worker.
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    Ok(uri)
}

/// `amqp://user:secret@host/` → `amqp://user:***@host/`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("amqp://user@host/"), "amqp://user@host/");
    }
}
