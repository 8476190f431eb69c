//! Events: what a worker started with `--events` publishes about each task message (`received`,
//! `started`, then its outcome, and `dead_lettered`) and about itself (`online`, `heartbeat`,
//! `offline`), as one JSON object each, with the routing key it is published under. Pure data.

use serde::Serialize;

/// One event: `{"event", "task", "id", "attempt", "worker", "at_ms"}`, plus `error` where there
/// is one. Worker events have no task, id or attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Event<'a> {
    pub(crate) event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) task: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) attempt: Option<u32>,
    pub(crate) worker: &'a str,
    pub(crate) at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'a str>,
}

impl Event<'_> {
    /// `task.<event>.<task name>` (the name may contain dots: bind with `#`), or
    /// `worker.<event>`.
    pub(crate) fn routing_key(&self) -> String {
        match self.task {
            Some(task) => ["task.", self.event, ".", task].concat(),
            None => ["worker.", self.event].concat(),
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_documented_shape_and_keys() {
        let event = Event {
            event: "failed",
            task: Some("math.div"),
            id: Some("42"),
            attempt: Some(1),
            worker: "host:7",
            at_ms: 1000,
            error: Some("division by zero"),
        };
        assert_eq!(event.routing_key(), "task.failed.math.div");
        assert_eq!(
            String::from_utf8(event.to_json()).unwrap(),
            r#"{"event":"failed","task":"math.div","id":"42","attempt":1,"worker":"host:7","at_ms":1000,"error":"division by zero"}"#
        );
        let online = Event {
            event: "online",
            task: None,
            id: None,
            attempt: None,
            worker: "host:7",
            at_ms: 5,
            error: None,
        };
        assert_eq!(online.routing_key(), "worker.online");
        assert_eq!(
            String::from_utf8(online.to_json()).unwrap(),
            r#"{"event":"online","worker":"host:7","at_ms":5}"#
        );
    }
}
