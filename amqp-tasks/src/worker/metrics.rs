//! Metrics (feature `metrics`): the worker's Prometheus registry, kept with the official
//! `prometheus-client` crate, and the small hyper server that serves it at `GET /metrics`
//! (`worker --metrics-addr`, [`WorkerBuilder::metrics_addr`](super::WorkerBuilder::metrics_addr)).
//!
//! Exposed samples: `amqp_tasks_tasks_total{task, outcome}` (the [`Outcome`]s),
//! `amqp_tasks_dead_letters_total{task, reason}`, `amqp_tasks_task_duration_seconds{task}` (a
//! histogram of handler run times), `amqp_tasks_tasks_in_flight`,
//! `amqp_tasks_redeliveries_total{task}`, `amqp_tasks_broker_sessions_total`. Labels are the
//! worker's own static names (task names it serves, outcome and reason names): a message cannot
//! grow the registry.

use crate::error::Error;
use crate::protocol::outcome::Outcome;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type Labels = [(&'static str, &'static str); 2];
type TaskLabel = [(&'static str, &'static str); 1];
type Histograms = Family<TaskLabel, Histogram, fn() -> Histogram>;

/// The worker's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    tasks: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    durations: Histograms,
    in_flight: Gauge,
    redeliveries: Family<TaskLabel, Counter>,
    sessions: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 33 s, doubling.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::default();
        let tasks = Family::<Labels, Counter>::default();
        let dead_letters = Family::<Labels, Counter>::default();
        let durations: Histograms = Family::new_with_constructor(duration_histogram);
        let in_flight = Gauge::default();
        let redeliveries = Family::<TaskLabel, Counter>::default();
        let sessions = Counter::default();
        // prometheus-client adds `_total` to a counter's name itself.
        registry.register(
            "amqp_tasks_tasks",
            "Task messages settled, by task and outcome",
            tasks.clone(),
        );
        registry.register(
            "amqp_tasks_dead_letters",
            "Messages dead-lettered, by task and reason",
            dead_letters.clone(),
        );
        registry.register(
            "amqp_tasks_task_duration_seconds",
            "How long handlers ran, in seconds",
            durations.clone(),
        );
        registry.register(
            "amqp_tasks_tasks_in_flight",
            "Handlers running now",
            in_flight.clone(),
        );
        registry.register(
            "amqp_tasks_redeliveries",
            "Messages the broker delivered again (their worker went away before acking them)",
            redeliveries.clone(),
        );
        registry.register(
            "amqp_tasks_broker_sessions",
            "Broker sessions the worker started consuming on",
            sessions.clone(),
        );
        Metrics {
            registry,
            tasks,
            dead_letters,
            durations,
            in_flight,
            redeliveries,
            sessions,
        }
    }

    pub(crate) fn settled(&self, task: &'static str, outcome: Outcome, ran_for: Option<Duration>) {
        self.tasks
            .get_or_create(&[("task", task), ("outcome", outcome.as_str())])
            .inc();
        if let Some(ran_for) = ran_for {
            self.durations
                .get_or_create(&[("task", task)])
                .observe(ran_for.as_secs_f64());
        }
    }

    pub(crate) fn dead_lettered(&self, task: &'static str, reason: &'static str) {
        self.dead_letters
            .get_or_create(&[("task", task), ("reason", reason)])
            .inc();
    }

    pub(crate) fn redelivered(&self, task: &'static str) {
        self.redeliveries.get_or_create(&[("task", task)]).inc();
    }

    pub(crate) fn session_started(&self) {
        self.sessions.inc();
    }

    pub(crate) fn running(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// The registry in the text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Serves `GET /metrics` on `addr` until the returned handle is aborted. Binding is done
/// before returning, so that a port in use is a start-up error; the address actually bound (a
/// port 0 picks one) is logged.
pub(crate) async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
) -> Result<(SocketAddr, JoinHandle<()>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot serve metrics on {addr}: {e}")))?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!("serving metrics on http://{bound}/metrics");
    let server = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::debug!(%error, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let response = respond(&metrics, &request);
                    std::future::ready(Ok::<_, std::convert::Infallible>(response))
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // A scraper that stops talking does not keep a task forever.
                let _ = tokio::time::timeout(Duration::from_secs(60), connection).await;
            });
        }
    });
    Ok((bound, server))
}

fn respond(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_have_the_documented_names() {
        let metrics = Metrics::new();
        metrics.settled("add", Outcome::Succeeded, Some(Duration::from_millis(3)));
        metrics.settled("add", Outcome::Succeeded, Some(Duration::from_millis(3)));
        metrics.settled("math.div", Outcome::Rejected, None);
        metrics.dead_lettered("math.div", "bad_payload");
        metrics.redelivered("add");
        metrics.session_started();
        metrics.running(1);
        let text = metrics.render();
        for sample in [
            r#"amqp_tasks_tasks_total{task="add",outcome="succeeded"} 2"#,
            r#"amqp_tasks_tasks_total{task="math.div",outcome="rejected"} 1"#,
            r#"amqp_tasks_dead_letters_total{task="math.div",reason="bad_payload"} 1"#,
            r#"amqp_tasks_task_duration_seconds_count{task="add"} 2"#,
            "amqp_tasks_tasks_in_flight 1",
            r#"amqp_tasks_redeliveries_total{task="add"} 1"#,
            "amqp_tasks_broker_sessions_total 1",
        ] {
            assert!(
                text.lines().any(|line| line == sample),
                "{sample} in\n{text}"
            );
        }
        assert!(
            !text.contains(r#"amqp_tasks_task_duration_seconds_count{task="math.div"}"#),
            "a refused message has no run time:\n{text}"
        );
    }
}
