//! Broker URLs: parsing what lapin takes (with this crate's default `frame_max`), and redacting
//! passwords for logs and errors. Pure; the session connects with the result.

use lapin::uri::{AMQPScheme, AMQPUri};

/// The largest AMQP frame a connection asks for unless its URL says otherwise (`?frame_max=`):
/// RabbitMQ's own default, so that the negotiated size is the broker's and any message the broker
/// accepted can be read (it never splits a content-header frame: headers larger than the
/// connection's `frame_max` would fail the whole connection). A smaller `?frame_max=` gives up
/// that promise.
pub(crate) const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// Parses a broker URL for lapin. A parse error never repeats the URL (whatever was given may
/// hold a password), only what is wrong with it.
pub(crate) fn parse(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse().map_err(|error: String| {
        let reason = error.replace(url, "…");
        format!("invalid broker URL ({reason}); expected amqp://user:password@host:port/vhost")
    })?;
    if uri.scheme == AMQPScheme::AMQPS {
        // lapin built without TLS would connect in plain TCP, sending the password in clear.
        return Err(format!(
            "`{}`: amqps:// needs TLS, which this build of amqp-tasks does not have; it will not \
             fall back to plain TCP",
            redact(url)
        ));
    }
    // lapin keeps 32 frames of buffer per direction and connection: asked for up front, the
    // buffers are allocated zeroed (untouched pages cost no memory until used), where growing
    // them after a smaller request would write every byte.
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    Ok(uri)
}

/// `amqp://user:secret@host/` → `amqp://user:***@host/`. Everything between the user's `:` and
/// the last `@` is hidden, so a password with `/` or `@` in it is hidden whole.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse, redact};

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(
            redact("amqp://user:pa/ss@wo@rd@host:5672/%2f"),
            "amqp://user:***@host:5672/%2f"
        );
    }

    #[test]
    fn parse_errors_do_not_show_the_password() {
        for url in [
            "amqp://user:s3cret@host:notaport/",
            "http://user:s3cret@host/",
            "s3cret",
        ] {
            let error = parse(url).unwrap_err();
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn amqps_is_refused_rather_than_sent_in_plain_tcp() {
        let error = parse("amqps://user:s3cret@host/%2f").unwrap_err();
        assert!(
            error.contains("TLS") && !error.contains("s3cret"),
            "{error}"
        );
    }
}
