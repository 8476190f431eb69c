//! Dispose: carry out what was decided for a delivery. Answer it on the delivery's own channel
//! (so that the reply is ordered before the ack), dead-letter it where due (waiting for the
//! confirm, before the ack), or publish a copy with new headers (a retry, a task not due yet, a
//! redelivery to count) and ack the original; then say how to settle it.

use super::consume::give_back;
use super::delivery::{Disposition, Target};
use super::settle::Settle;
use super::{Lane, QueueState, Shared};
use crate::error::CallError;
use crate::protocol::codec::Codec;
use crate::protocol::dead_letter::dead_letter_properties;
use crate::protocol::headers::{DEAD_ERROR_MAX, TaskHeaders, fit, truncate};
use crate::protocol::properties::copy_properties;
use crate::protocol::reply::ErrorKind;
use crate::protocol::topology::{dead_letter_queue, redelivered_queue};
use crate::protocol::{expiration, unix_ms};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, BasicQosOptions};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Carries out a disposition and says how to settle the delivery.
pub(crate) async fn dispose(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    disposition: Disposition<'_>,
) -> Settle {
    match disposition {
        Disposition::Answer {
            reply,
            codec,
            dead_letter,
        } => respond(shared, queue, delivery, reply, codec, dead_letter).await,
        // Boxed: rare paths, kept out of the future every delivery allocates.
        Disposition::Forward {
            headers,
            why,
            target,
        } => Box::pin(forward(shared, queue, delivery, headers, why, target)).await,
    }
}

/// Answers (on the delivery's own channel, so that the reply is ordered before the ack), then
/// dead-letters where due (waiting for the confirm), and says how to settle the delivery.
async fn respond(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    (kind, body): (&'static str, Vec<u8>),
    codec: Codec,
    dead_letter: Option<(ErrorKind, String)>,
) -> Settle {
    let properties = &delivery.properties;
    if let Some(reply_to) = properties.reply_to() {
        // Only what the caller reads: every property costs the broker and both ends.
        let mut reply = BasicProperties::default()
            .with_content_type(codec.content_type().into())
            .with_type(kind.into());
        if let Some(correlation_id) = properties.correlation_id() {
            reply = reply.with_correlation_id(correlation_id.clone());
        }
        // Boxed: lapin's publish future is large, and a fire-and-forget task never needs it.
        let published = Box::pin(queue.channel.basic_publish(
            "".into(),
            reply_to.clone(),
            BasicPublishOptions::default(),
            &body,
            reply,
        ))
        .await;
        if let Err(error) = published {
            // The channel is gone: so is the unacked delivery, which the broker will redeliver.
            tracing::warn!(%error, "could not publish the reply");
            return Settle::Requeue(delivery.delivery_tag);
        }
    }
    if let Some((kind, message)) = dead_letter {
        match Box::pin(dead_letter_it(shared, queue, delivery, kind, &message)).await {
            Ok(()) => {
                queue.dead_letters.succeeded();
                shared
                    .observer
                    .dead_lettered(queue, delivery, kind.as_str(), &message);
            }
            Err(error) => return Box::pin(hold_back(shared, queue, delivery, error)).await,
        }
    }
    Settle::Ack(delivery.delivery_tag)
}

/// A dead letter that cannot be published (its `.dlq` deleted, or full and refusing): the message
/// stays in its queue. It is held for a backoff that grows with each failure in a row (so that a
/// failing `.dlq` does not turn the worker into a loop), logged once per interval, then given back
/// to its queue to be tried again; normal work goes on meanwhile, and shutdown cuts the wait.
async fn hold_back(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    error: CallError,
) -> Settle {
    let wait = queue.dead_letters.failed();
    if let Some(suppressed) = queue.dead_letters.should_log() {
        tracing::error!(
            %error,
            queue = %queue.main,
            retry_in = ?wait,
            "could not dead-letter a message (and {suppressed} more since the last report); \
             it stays in its queue"
        );
    }
    let mut stopping = shared.stopping.subscribe();
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        _ = stopping.wait_for(|stopping| *stopping) => {}
    }
    give_back(shared, queue, &[delivery]).await;
    Settle::Given(delivery.delivery_tag)
}

/// Publishes a copy of the delivery with new headers to `target` (through the delay queues when
/// its eta is ahead), waits for the confirm, then acks the original.
async fn forward(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    headers: TaskHeaders<'_>,
    why: &'static str,
    target: Target,
) -> Settle {
    let original = &delivery.properties;
    let table = headers.write_into(original.headers().clone().unwrap_or_default());
    // Room for the delay bucket header the route may add.
    let table = fit(table, queue.budget.write.saturating_sub(64));
    let mut properties = copy_properties(original).with_headers(table);
    if let Some(deadline) = headers.deadline_ms {
        let left = deadline.saturating_sub(unix_ms(SystemTime::now()));
        properties = properties.with_expiration(expiration(left));
    }
    if let Some(mode) = original.delivery_mode() {
        properties = properties.with_delivery_mode(*mode);
    }
    let to = match target {
        Target::Same => queue.name.clone(),
        Target::Main => queue.main.clone(),
        Target::Redelivered => redelivered_queue(&queue.main),
    };
    let client = &shared.client;
    let deadline = Instant::now() + client.confirm_timeout();
    match client
        .publish(&to, &delivery.data, properties, headers.eta_ms, deadline)
        .await
    {
        Ok(()) => {
            tracing::debug!(queue = %queue.name, to = %to, why, eta = ?headers.eta_ms, "sent on");
            // Acked now rather than batched: the copy is in the queue already, and a crash before
            // the ack would leave two of them.
            // (If the channel is gone, the broker returns the original along with it.)
            let _ = queue
                .channel
                .basic_ack(
                    delivery.delivery_tag,
                    lapin::options::BasicAckOptions::default(),
                )
                .await;
            if to != queue.name || queue.lane == Lane::Redelivered {
                // A copy bound for the redelivered lane runs alone, and may kill this process:
                // by then the broker must have the original's ack. It has once a method sent after
                // the ack on this channel is answered (the broker handles a channel in order).
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    queue
                        .channel
                        .basic_qos(queue.prefetch, BasicQosOptions { global: false }),
                )
                .await;
            }
            Settle::AckedAlone(delivery.delivery_tag)
        }
        Err(error) => {
            tracing::warn!(%error, queue = %queue.name, why, "could not send a task on; returning it to its queue");
            Settle::Requeue(delivery.delivery_tag)
        }
    }
}

/// Publishes the dead letter of a delivery to its queue's `.dlq` and waits for the confirm.
async fn dead_letter_it(
    shared: &Shared,
    queue: &QueueState,
    delivery: &Delivery,
    kind: ErrorKind,
    message: &str,
) -> Result<(), CallError> {
    let message = truncate(message, DEAD_ERROR_MAX);
    let properties = dead_letter_properties(&delivery.properties, kind, &message, &queue.main);
    let properties = match properties.headers() {
        Some(table) => {
            let table = fit(table.clone(), queue.budget.write);
            properties.with_headers(table)
        }
        None => properties,
    };
    let dlq = dead_letter_queue(&queue.main);
    let client = &shared.client;
    let deadline = Instant::now() + client.confirm_timeout();
    client
        .publish(&dlq, &delivery.data, properties, None, deadline)
        .await
}
