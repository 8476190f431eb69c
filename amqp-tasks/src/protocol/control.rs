//! Control messages (`amqp-tasks inspect`, `amqp-tasks revoke`): the request a command sends to every worker of a
//! namespace through the control exchange (fanout), and the answer each live worker sends back to
//! its `reply_to`; the messages of the revocations stream. Pure data, JSON on the wire.

use serde::{Deserialize, Serialize};

/// What `inspect` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Inspect {
    /// Who is alive: its id and uptime.
    Ping,
    /// The tasks it serves.
    Registered,
    /// What it runs now: task, id, for how long.
    Active,
    /// Its counters: outcomes so far, in flight, concurrency.
    Stats,
}

impl Inspect {
    #[cfg(any(test, feature = "cli"))]
    pub(crate) fn parse(text: &str) -> Option<Inspect> {
        serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
    }
}

/// The body of a control request.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Request {
    pub(crate) inspect: Inspect,
}

/// A message of the revocations stream: task ids revoked (and whether to cancel them where
/// they run), or a worker's own marker, appended to know where the stream ended when it started
/// reading.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Revocation {
    Revoke { ids: Vec<String>, terminate: bool },
    Marker(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        let text = serde_json::to_string(&Request {
            inspect: Inspect::Active,
        })
        .unwrap();
        assert_eq!(text, r#"{"inspect":"active"}"#);
        let back: Request = serde_json::from_str(&text).unwrap();
        assert_eq!(back.inspect, Inspect::Active);
        assert_eq!(Inspect::parse("stats"), Some(Inspect::Stats));
        assert_eq!(Inspect::parse("nope"), None);
        let revoke = Revocation::Revoke {
            ids: vec!["a".into()],
            terminate: true,
        };
        let text = serde_json::to_string(&revoke).unwrap();
        assert_eq!(text, r#"{"revoke":{"ids":["a"],"terminate":true}}"#);
        assert_eq!(serde_json::from_str::<Revocation>(&text).unwrap(), revoke);
    }
}
