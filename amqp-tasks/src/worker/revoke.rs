//! Revocations (`amqp-tasks revoke <id>... [--terminate]`): the task ids this worker must not
//! run, read from the namespace's revocations stream (kept by the broker for 24 h). At start-up
//! the worker appends a marker of its own and reads the stream from its first message up to that
//! marker before it takes tasks, so that a task revoked before this worker started is not run;
//! then it follows the stream. A revocation with `terminate` also cancels the task where it runs
//! ([`Control::terminate`]).

use super::control::Control;
use crate::client::Client;
use crate::protocol::control::Revocation;
use crate::protocol::topology::revocations_queue;
use crate::transport::next;
use crate::transport::topology::declare_revocations;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long opening the stream, or appending the marker, may take.
const PATIENCE: Duration = Duration::from_secs(10);

/// The task ids revoked.
#[derive(Debug, Default)]
pub(crate) struct Revocations {
    any: AtomicBool,
    ids: Mutex<HashSet<String>>,
    /// Set once the stream was read up to this worker's marker.
    ready: watch::Sender<bool>,
}

impl Revocations {
    /// Whether `id` was revoked (one atomic load while nothing is).
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.any.load(Ordering::Acquire)
            && self
                .ids
                .lock()
                .is_ok_and(|ids| !id.is_empty() && ids.contains(id))
    }

    fn insert(&self, ids: Vec<String>) {
        if let Ok(mut known) = self.ids.lock() {
            known.extend(ids);
        }
        self.any.store(true, Ordering::Release);
    }

    /// Waits until the stream was read up to this worker's marker, for at most `limit`; false if
    /// it was not.
    pub(crate) async fn ready(&self, limit: Duration) -> bool {
        let mut ready = self.ready.subscribe();
        tokio::time::timeout(limit, ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Follows the revocations stream for as long as it runs (the worker aborts it when it stops),
/// reading it again from the start after a lost channel.
pub(crate) async fn follow(client: Client, revocations: Arc<Revocations>, control: Arc<Control>) {
    let queue = revocations_queue(client.namespace());
    loop {
        match open(&client, &queue).await {
            Some((channel, mut consumer, marker)) => {
                while let Some(Ok(delivery)) = next(&mut consumer).await {
                    match serde_json::from_slice::<Revocation>(&delivery.data) {
                        Ok(Revocation::Revoke { ids, terminate }) => {
                            if terminate {
                                for id in &ids {
                                    let cancelled = control.terminate(id);
                                    if cancelled > 0 {
                                        tracing::info!(id, "revoked with --terminate: cancelled");
                                    }
                                }
                            }
                            revocations.insert(ids);
                        }
                        Ok(Revocation::Marker(seen)) if seen == marker => {
                            tracing::debug!("revocations read; {queue} followed from here");
                            revocations.ready.send_replace(true);
                        }
                        Ok(Revocation::Marker(_)) => {}
                        Err(_) => tracing::debug!("an unreadable revocation; ignored"),
                    }
                    let _ = channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await;
                }
            }
            None => tracing::warn!("cannot read the revocations stream {queue} now; trying again"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The stream declared, this worker's marker appended, and a consumer from its first message.
async fn open(client: &Client, queue: &str) -> Option<(Channel, Consumer, String)> {
    let opened = tokio::time::timeout(PATIENCE, async {
        let session = client.session().await.ok()?;
        let channel = session.connection.create_channel().await.ok()?;
        declare_revocations(&channel, queue).await.ok()?;
        let marker = crate::protocol::trace::random_uuid().simple().to_string();
        let body = serde_json::to_vec(&Revocation::Marker(marker.clone())).ok()?;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        client
            .publish(queue, &body, properties, None, Instant::now() + PATIENCE)
            .await
            .ok()?;
        // A stream is consumed with a prefetch and manual acks, from an offset.
        channel
            .basic_qos(100, BasicQosOptions { global: false })
            .await
            .ok()?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .ok()?;
        Some((channel, consumer, marker))
    })
    .await;
    opened.ok().flatten()
}
