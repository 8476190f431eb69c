//! The `opentelemetry` feature, in one process (the SDK's in-memory exporter sees one process):
//! a producer's span, a relay's `task` span and the `task` span of the task the relay calls form
//! one OpenTelemetry trace with the right parent links; a producer outside any span starts a new
//! trace at the worker, and the task's own trace id is that trace's.

use amqp_tasks::Worker;
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, bounded, eventually, eventually_async};
use amqp_tasks_tests::tasks::*;
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use std::time::Duration;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const LIMIT: Duration = Duration::from_secs(60);

/// The value of a span's attribute, as text.
fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The exported spans that `pick` selects, once there are `count` of them.
async fn exported(
    exporter: &InMemorySpanExporter,
    what: &str,
    count: usize,
    pick: impl Fn(&SpanData) -> bool,
) -> Vec<SpanData> {
    eventually(what, PATIENCE, || {
        let spans: Vec<SpanData> = exporter
            .get_finished_spans()
            .expect("the in-memory exporter answers")
            .into_iter()
            .filter(|span| pick(span))
            .collect();
        (spans.len() >= count).then_some(spans)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_relay_and_worker_spans_form_one_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("amqp-tasks-tests")));
    // Global: the embedded worker runs its tasks on the runtime's other threads.
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let env = TestEnv::new("otel");
    bounded(LIMIT, async {
        let client = env.client().await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(
            Worker::builder(client.clone())
                .tasks(["relay_trace", "context_info"])
                .concurrency(4)
                .serve(async move {
                    let _ = stopped.await;
                }),
        );

        // A producer outside any span: the worker's `task` span starts the trace, and the task's
        // trace id is the span's.
        let (root_trace, _, _, _, _) =
            eventually_async(|| async { context_info::new().call(&client).await.ok() }).await;
        let roots = exported(&exporter, "the root task's span in its trace", 1, |span| {
            span.name == "task" && span.span_context.trace_id().to_string() == root_trace
        })
        .await;
        assert_eq!(roots.len(), 1, "{roots:#?}");
        let root = &roots[0];
        assert_eq!(attribute(root, "name").as_deref(), Some("context_info"));
        assert_eq!(root.parent_span_id, SpanId::INVALID, "{root:#?}");
        assert_eq!(
            attribute(root, "trace_id").as_deref(),
            Some(root_trace.as_str())
        );

        // producer span → relay's `task` span → downstream `task` span.
        let producer = tracing::info_span!("producer");
        let (relay_trace, downstream_trace, downstream_parent, relay_id) = async {
            relay_trace::new()
                .call(&client)
                .await
                .expect("the relay answers")
        }
        .instrument(producer.clone())
        .await;
        drop(producer);
        assert_eq!(downstream_parent.as_deref(), Some(relay_id.as_str()));

        let producers = exported(&exporter, "the producer's span", 1, |span| {
            span.name == "producer"
        })
        .await;
        assert_eq!(producers.len(), 1, "{producers:#?}");
        let producer = &producers[0];
        let trace_id = producer.span_context.trace_id();
        assert_eq!(producer.parent_span_id, SpanId::INVALID);
        // The tasks' own trace ids are the producer's.
        assert_eq!(relay_trace, trace_id.to_string());
        assert_eq!(downstream_trace, trace_id.to_string());

        let relays = exported(&exporter, "the relay's span", 1, |span| {
            span.name == "task" && attribute(span, "id").as_deref() == Some(relay_id.as_str())
        })
        .await;
        assert_eq!(relays.len(), 1, "{relays:#?}");
        let relay = &relays[0];
        assert_eq!(attribute(relay, "name").as_deref(), Some("relay_trace"));
        assert_eq!(relay.span_context.trace_id(), trace_id);
        assert_eq!(relay.parent_span_id, producer.span_context.span_id());
        assert!(relay.parent_span_is_remote, "{relay:#?}");

        let downstream = exported(&exporter, "the downstream task's span", 1, |span| {
            span.name == "task"
                && attribute(span, "parent_id").as_deref() == Some(relay_id.as_str())
        })
        .await;
        assert_eq!(downstream.len(), 1, "{downstream:#?}");
        let downstream = &downstream[0];
        assert_eq!(
            attribute(downstream, "name").as_deref(),
            Some("context_info")
        );
        assert_eq!(downstream.span_context.trace_id(), trace_id);
        assert_eq!(downstream.parent_span_id, relay.span_context.span_id());
        // Three spans in the trace (the framework opens no others per hop).
        let in_trace = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|span| span.span_context.trace_id() == trace_id)
            .count();
        assert_eq!(in_trace, 3);

        stop.send(()).unwrap();
        worker
            .await
            .unwrap()
            .expect("the embedded worker drains and returns Ok");
    })
    .await;
    let _ = provider.shutdown();
}
