//! The `opentelemetry` feature: the bridge between the W3C `traceparent` a task message carries
//! and the OpenTelemetry context of `tracing` spans (through `tracing-opentelemetry`). A worker's
//! `task` span takes the incoming `traceparent` as its parent; a call sent inside a span carries
//! that span's context. Without the `tracing-opentelemetry` layer installed, nothing changes.

use crate::protocol::trace::TraceParent;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` (created, not yet entered) a child of the caller's span `incoming`, and returns
/// the trace the task continues: `span`'s own context (the caller's trace id, or a new trace
/// when there was no caller). `None` when no OpenTelemetry layer records `span`.
pub(crate) fn join(span: &tracing::Span, incoming: Option<&TraceParent>) -> Option<TraceParent> {
    if let Some(incoming) = incoming {
        let (trace_id, span_id, flags) = incoming.ids();
        let remote = SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(span_id),
            TraceFlags::new(flags),
            true,
            TraceState::NONE,
        );
        // Fails only without the layer (then the span context read below is invalid too).
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    of(span)
}

/// The context of the current span, for a call sent from inside it; `None` outside spans or
/// without the OpenTelemetry layer.
pub(crate) fn current() -> Option<TraceParent> {
    of(&tracing::Span::current())
}

fn of(span: &tracing::Span) -> Option<TraceParent> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        TraceParent::from_ids(
            span_context.trace_id().to_bytes(),
            span_context.span_id().to_bytes(),
            span_context.trace_flags().to_u8(),
        )
    })
}
