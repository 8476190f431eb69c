//! Consuming: one channel and consumer per task queue (manual acks, a small prefetch, an acker
//! each), the loop that starts a handler per delivery once a concurrency slot is free, and the
//! drain at shutdown (prefetched deliveries not started go back, those in flight finish within
//! the grace period, every ack is sent).

use super::delivery;
use super::registry::Registration;
use super::settle::{self, Settle};
use super::{QueueState, Shared};
use crate::error::{BrokerError, Error};
use crate::protocol::headers::HeaderBudget;
use crate::transport::next;
use crate::transport::session::Session;
use crate::transport::topology::{declare_delays, declare_task_queue};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub(crate) struct QueueConsumer {
    state: Arc<QueueState>,
    consumer: Consumer,
    acker: tokio::task::JoinHandle<()>,
}

pub(crate) enum Ended {
    Shutdown,
    Lost(String),
}

pub(crate) async fn open_consumers(
    shared: &Shared,
    session: &Session,
    queues: &BTreeMap<String, Vec<&'static Registration>>,
) -> Result<Vec<QueueConsumer>, Error> {
    let broker = |action: String| {
        move |source| Error::Broker {
            action,
            source: BrokerError::new(source),
        }
    };
    let mut consumers = Vec::with_capacity(queues.len());
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(broker("opening a channel".to_owned()))?;
    declare_delays(&channel, shared.client.namespace())
        .await
        .map_err(broker("declaring the delay queues".to_owned()))?;
    let _ = channel.close(200, "declared".into()).await;
    for (queue, tasks) in queues {
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(broker(format!("opening a channel for `{queue}`")))?;
        declare_task_queue(&channel, queue, shared.settings.queue_type)
            .await
            .map_err(broker(format!(
                "declaring `{queue}` and its dead-letter queue"
            )))?;
        channel
            .basic_qos(shared.settings.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(broker(format!("setting the prefetch of `{queue}`")))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!("consuming `{queue}`")))?;
        let (acks, acker) = settle::spawn(channel.clone());
        consumers.push(QueueConsumer {
            state: Arc::new(QueueState {
                name: queue.clone(),
                tasks: tasks.clone(),
                channel,
                acks,
                budget: HeaderBudget::for_frame_max(session.frame_max()),
            }),
            consumer,
            acker,
        });
    }
    Ok(consumers)
}

pub(crate) async fn run(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    consumers: Vec<QueueConsumer>,
    shutdown: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
) -> (Ended, Vec<Closing>) {
    let (stop, stopped) = watch::channel(false);
    let mut closings = Vec::new();
    let mut loops = JoinSet::new();
    for consumer in consumers {
        loops.spawn(consume(shared.clone(), consumer, stopped.clone()));
    }
    let ended = tokio::select! {
        () = shutdown.as_mut() => Ended::Shutdown,
        reason = session.lost() => Ended::Lost(reason),
        Some(Ok((reason, closing))) = loops.join_next() => {
            closings.push(closing);
            Ended::Lost(reason)
        }
    };
    let _ = stop.send(true);
    while let Some(result) = loops.join_next().await {
        closings.extend(result.ok().map(|(_, closing)| closing));
    }
    (ended, closings)
}

/// A channel to close once its acker has sent the last acks.
pub(crate) struct Closing {
    channel: Channel,
    acker: tokio::task::JoinHandle<()>,
}

pub(crate) async fn close_all(closings: Vec<Closing>) {
    for Closing { channel, acker } in closings {
        // The acker ends once every handler of the channel has settled.
        let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
        let _ = channel.close(200, "worker stopping".into()).await;
    }
}

/// Receives deliveries of one queue and starts a handler for each once a slot is free.
async fn consume(
    shared: Arc<Shared>,
    consumer: QueueConsumer,
    mut stop: watch::Receiver<bool>,
) -> (String, Closing) {
    let QueueConsumer {
        state,
        mut consumer,
        acker,
    } = consumer;
    // One stop future for the whole loop, not a new registration per delivery.
    let stopped = stop.wait_for(|stop| *stop);
    tokio::pin!(stopped);
    let reason = loop {
        let delivery = tokio::select! {
            biased;
            _ = &mut stopped => break None,
            item = next(&mut consumer) => match item {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => break Some(format!("consumer of `{}`: {error}", state.name)),
                None => break Some(format!("the broker cancelled the consumer of `{}`", state.name)),
            },
        };
        let permit = match shared.semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => break None,
            Err(tokio::sync::TryAcquireError::NoPermits) => tokio::select! {
                biased;
                _ = &mut stopped => {
                    state.acks.send(Settle::Requeue(delivery.delivery_tag));
                    break None;
                }
                permit = shared.semaphore.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break None,
                },
            },
        };
        let guard = shared.in_flight.enter();
        tokio::spawn(delivery::handle(
            shared.clone(),
            state.clone(),
            delivery,
            permit,
            guard,
        ));
    };
    if reason.is_none() {
        // Shutdown: no more deliveries; those already prefetched go back to the queue.
        let _ = state
            .channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let drain = async {
            while let Some(Ok(delivery)) = next(&mut consumer).await {
                state.acks.send(Settle::Requeue(delivery.delivery_tag));
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
    let closing = Closing {
        channel: state.channel.clone(),
        acker,
    };
    (reason.unwrap_or_else(|| "stopped".to_owned()), closing)
}

pub(crate) async fn drain(shared: &Shared, closings: Vec<Closing>) -> Result<(), Error> {
    let running = shared.in_flight.count();
    if running > 0 {
        tracing::info!(running, grace = ?shared.settings.grace, "waiting for tasks in flight");
    }
    let finished = tokio::time::timeout(shared.settings.grace, shared.in_flight.idle())
        .await
        .is_ok();
    let running_at_expiry = shared.in_flight.count();
    if !finished {
        // Cancel what still runs; closing the channels returns its deliveries to the queues.
        let _ = shared.abandon.send(true);
        for closing in &closings {
            closing.acker.abort();
        }
    }
    close_all(closings).await;
    if finished {
        tracing::info!("worker stopped");
        Ok(())
    } else {
        Err(Error::GraceExpired(
            shared.settings.grace,
            running_at_expiry,
        ))
    }
}
