//! Broker URLs: lists of whole URLs (several nodes), each parsed into what lapin takes (with
//! this crate's default `frame_max`, and the TLS parameters lapin ignores taken out), and
//! passwords redacted for logs and errors. The session connects with the result.

use super::tls::{Tls, TlsOptions};
use lapin::uri::{AMQPScheme, AMQPUri};

/// The largest AMQP frame a connection asks for unless its URL says otherwise (`?frame_max=`):
/// RabbitMQ's own default, so that the negotiated size is the broker's and any message the broker
/// accepted can be read (it never splits a content-header frame: headers larger than the
/// connection's `frame_max` would fail the whole connection). A smaller `?frame_max=` gives up
/// that promise.
pub(crate) const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// One broker node to connect to: the URL for lapin (TLS parameters taken out), how to speak TLS
/// to it, and how logs show it.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) uri: AMQPUri,
    pub(crate) tls: Option<Tls>,
    /// The URL as given, password redacted.
    pub(crate) shown: String,
}

/// Parses a broker URL, or a comma-separated list of whole URLs (each with its own parameters).
/// An error never repeats a URL (whatever was given may hold a password), only what is wrong.
pub(crate) fn parse_list(urls: &str) -> Result<Vec<Endpoint>, String> {
    let endpoints = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .enumerate()
        .map(|(i, url)| {
            parse(url).map_err(|error| match urls.contains(',') {
                true => format!("URL {} of the list: {error}", i + 1),
                false => error,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err("no broker URL given".to_owned());
    }
    Ok(endpoints)
}

/// Parses one broker URL.
pub(crate) fn parse(url: &str) -> Result<Endpoint, String> {
    let (for_lapin, tls) = take_tls_parameters(url)?;
    let mut uri: AMQPUri = for_lapin.parse().map_err(|error: String| {
        let reason = error.replace(for_lapin.as_str(), "…");
        format!("invalid broker URL ({reason}); expected amqp://user:password@host:port/vhost")
    })?;
    // lapin keeps 32 frames of buffer per direction and connection: asked for up front, the
    // buffers are allocated zeroed (untouched pages cost no memory until used), where growing
    // them after a smaller request would write every byte.
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let tls = match uri.scheme {
        AMQPScheme::AMQPS => Some(Tls::new(&tls, &uri.authority.host)?),
        AMQPScheme::AMQP if tls.is_set() => {
            return Err(format!(
                "`{}`: TLS parameters on an amqp:// URL; use amqps:// for TLS",
                redact(url)
            ));
        }
        AMQPScheme::AMQP => None,
    };
    Ok(Endpoint {
        uri,
        tls,
        shown: redact(url),
    })
}

impl Endpoint {
    /// Asks for a heartbeat every `max` seconds at most (one the URL sets lower is kept; 0,
    /// which turns heartbeats off, is not).
    pub(crate) fn cap_heartbeat(&mut self, max: u16) {
        let max = max.max(1);
        let heartbeat = &mut self.uri.query.heartbeat;
        *heartbeat = Some(match *heartbeat {
            Some(set) if set > 0 => set.min(max),
            _ => max,
        });
    }
}

/// The URL without the TLS parameters of RabbitMQ's URI spec (which lapin does not read), and
/// those parameters.
fn take_tls_parameters(url: &str) -> Result<(String, TlsOptions), String> {
    let mut tls = TlsOptions::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), tls));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !tls.take(key, &percent_decoded(value))? {
            kept.push(pair);
        }
    }
    let url = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((url, tls))
}

/// `%2F` → `/` (file paths in query values are percent-encoded in a URL).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    use super::{parse, parse_list, redact, take_tls_parameters};

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
    fn tls_parameters_are_taken_out_for_lapin() {
        let (url, tls) = take_tls_parameters(
            "amqps://u:p@host/%2f?heartbeat=5&cacertfile=%2Ftmp%2Fca.pem&verify=verify_none&auth_mechanism=external",
        )
        .unwrap();
        assert_eq!(
            url,
            "amqps://u:p@host/%2f?heartbeat=5&auth_mechanism=external"
        );
        assert_eq!(
            tls.cacertfile.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert!(tls.verify_none);
        let error = parse("amqp://u:s3cret@host/?cacertfile=/ca.pem")
            .map(|_| ())
            .unwrap_err();
        assert!(
            error.contains("amqps") && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[test]
    fn heartbeats_can_be_capped() {
        let mut nodes = parse_list(
            "amqp://a:1@n1/%2f, amqp://a:1@n2/%2f?heartbeat=3, amqp://a:1@n3/%2f?heartbeat=0",
        )
        .unwrap();
        for node in &mut nodes {
            node.cap_heartbeat(5);
        }
        let heartbeats: Vec<_> = nodes.iter().map(|n| n.uri.query.heartbeat).collect();
        assert_eq!(heartbeats, [Some(5), Some(3), Some(5)]);
    }

    #[test]
    fn lists_are_whole_urls() {
        let nodes =
            parse_list("amqp://a:1@n1:5672/%2f, amqp://a:1@n2:5673/%2f?heartbeat=3").unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].uri.authority.port, 5673);
        assert_eq!(nodes[0].shown, "amqp://a:***@n1:5672/%2f");
        let error = parse_list("amqp://a:s3cret@n1/%2f,nonsense")
            .map(|_| ())
            .unwrap_err();
        assert!(
            error.contains("URL 2") && !error.contains("s3cret"),
            "{error}"
        );
        assert!(parse_list(" , ").is_err());
    }
}
