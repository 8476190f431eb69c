//! Consuming: per task queue, two channels and consumers (the queue itself, with a small
//! prefetch, and its redelivered lane, one delivery at a time), manual acks with an acker each;
//! one channel of presence consumers; the loop that starts a handler per delivery once a
//! concurrency slot is free; and the drain at shutdown (deliveries not started are given back,
//! those in flight finish within the grace period, every ack is sent). Nothing here waits without
//! a bound: a broker that stops answering ends the session, and the supervisor starts another.

use super::delivery;
use super::registry::Registration;
use super::settle::{self, Settle};
use super::{Lane, QueueState, Shared};
use crate::error::{BrokerError, Error};
use crate::protocol::SHORT_MAX;
use crate::protocol::headers::HeaderBudget;
use crate::protocol::properties::copy_properties;
use crate::protocol::topology::{presence_queue, redelivered_queue};
use crate::transport::next;
use crate::transport::publish::Message;
use crate::transport::session::Session;
use crate::transport::topology::{declare_delays, declare_presence, declare_task_queue};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long closing a channel, cancelling a consumer or sending the last acks may take.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);
/// How often the session's connection is checked, besides its events.
const LIVENESS: Duration = Duration::from_secs(1);

pub(crate) struct QueueConsumer {
    state: Arc<QueueState>,
    consumer: Consumer,
    acker: tokio::task::JoinHandle<()>,
}

pub(crate) enum Ended {
    Shutdown,
    Lost(String),
}

/// What a session consumes: the task queues and their lanes, and the presence channel (whose
/// consumers say which tasks this worker serves, for as long as the channel lives).
pub(crate) struct Consumers {
    queues: Vec<QueueConsumer>,
    presence: Option<(Channel, Vec<Consumer>)>,
}

impl Consumers {
    pub(crate) fn len(&self) -> usize {
        self.queues.len()
    }
}

fn broker(action: String) -> impl FnOnce(lapin::Error) -> Error {
    move |source| Error::Broker {
        action,
        source: BrokerError::new(source),
    }
}

pub(crate) async fn open_consumers(
    shared: &Shared,
    session: &Session,
    queues: &BTreeMap<String, Vec<&'static Registration>>,
) -> Result<Consumers, Error> {
    let mut consumers = Vec::with_capacity(2 * queues.len());
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(broker("opening a channel".to_owned()))?;
    declare_delays(
        &channel,
        shared.client.namespace(),
        shared.settings.queue_type,
    )
    .await
    .map_err(broker("declaring the delay queues".to_owned()))?;
    close(&channel, "declared").await;
    let budget = HeaderBudget::for_frame_max(session.frame_max());
    for (queue, tasks) in queues {
        let declared = session
            .connection
            .create_channel()
            .await
            .map_err(broker(format!("opening a channel for `{queue}`")))?;
        declare_task_queue(&declared, queue, shared.settings.queue_type)
            .await
            .map_err(broker(format!(
                "declaring `{queue}`, its dead-letter queue and its redelivered lane"
            )))?;
        close(&declared, "declared").await;
        let lanes = [
            (Lane::Main, queue.clone(), shared.settings.prefetch),
            (Lane::Redelivered, redelivered_queue(queue), 1),
        ];
        for (lane, name, prefetch) in lanes {
            let channel = session
                .connection
                .create_channel()
                .await
                .map_err(broker(format!("opening a channel for `{name}`")))?;
            channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(broker(format!("setting the prefetch of `{name}`")))?;
            let consumer = channel
                .basic_consume(
                    name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(broker(format!("consuming `{name}`")))?;
            let (acks, acker) = settle::spawn(channel.clone(), prefetch);
            consumers.push(QueueConsumer {
                state: Arc::new(QueueState {
                    name,
                    main: queue.clone(),
                    lane,
                    prefetch,
                    tasks: tasks.clone(),
                    channel,
                    acks,
                    budget,
                    dead_letters: Default::default(),
                }),
                consumer,
                acker,
            });
        }
    }
    let presence = open_presence(shared, session, queues).await?;
    Ok(Consumers {
        queues: consumers,
        presence,
    })
}

/// Consumes the presence queue of every task served (those whose name fits a queue name).
async fn open_presence(
    shared: &Shared,
    session: &Session,
    queues: &BTreeMap<String, Vec<&'static Registration>>,
) -> Result<Option<(Channel, Vec<Consumer>)>, Error> {
    let names: Vec<String> = queues
        .values()
        .flatten()
        .map(|task| presence_queue(shared.client.namespace(), task.name()))
        .filter(|name| name.len() <= SHORT_MAX)
        .collect();
    if names.is_empty() {
        return Ok(None);
    }
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(broker("opening the presence channel".to_owned()))?;
    let mut consumers = Vec::with_capacity(names.len());
    for name in names {
        declare_presence(&channel, &name)
            .await
            .map_err(broker(format!("declaring `{name}`")))?;
        let consumer = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!("consuming `{name}`")))?;
        consumers.push(consumer);
    }
    Ok(Some((channel, consumers)))
}

pub(crate) async fn run(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    consumers: Consumers,
    shutdown: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
) -> (Ended, Vec<Closing>) {
    let (stop, stopped) = watch::channel(false);
    let mut closings = Vec::new();
    let mut loops = JoinSet::new();
    for consumer in consumers.queues {
        loops.spawn(consume(shared.clone(), consumer, stopped.clone()));
    }
    let mut liveness = tokio::time::interval(LIVENESS);
    liveness.tick().await;
    let ended = loop {
        tokio::select! {
            () = shutdown.as_mut() => break Ended::Shutdown,
            reason = session.lost() => break Ended::Lost(reason),
            Some(Ok((reason, closing))) = loops.join_next() => {
                closings.push(closing);
                break Ended::Lost(reason);
            }
            // The connection's events do not always say it died (a frame error, a socket gone
            // quiet): its status does.
            _ = liveness.tick() => {
                if !session.is_alive() {
                    let reason = "the connection is no longer connected".to_owned();
                    session.mark_lost(reason.clone());
                    break Ended::Lost(reason);
                }
            }
        }
    };
    if matches!(ended, Ended::Shutdown) {
        let _ = shared.stopping.send(true);
    }
    let _ = stop.send(true);
    while let Some(result) = loops.join_next().await {
        closings.extend(result.ok().map(|(_, closing)| closing));
    }
    if let Some((channel, _consumers)) = consumers.presence {
        tokio::spawn(async move { close(&channel, "worker stopping").await });
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
        let _ = tokio::time::timeout(CLOSE_PATIENCE, acker).await;
        close(&channel, "worker stopping").await;
    }
}

/// Closes a channel, giving up after a while (a dead connection never answers).
async fn close(channel: &Channel, why: &str) {
    let _ = tokio::time::timeout(CLOSE_PATIENCE, channel.close(200, why.into())).await;
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
    let mut unstarted = Vec::new();
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
                    unstarted.push(delivery);
                    break None;
                }
                permit = shared.semaphore.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break None,
                },
            },
        };
        let guard = shared.in_flight.enter();
        let handled = delivery::handle(shared.clone(), state.clone(), delivery, permit, guard);
        // Boxed: the future of a whole delivery is large, and tokio moves an unboxed future into
        // its task and writes its stage over it again at the end (memcpy was the largest single
        // cost of a worker per task under callgrind; a box is one allocation).
        tokio::spawn(Box::pin(handled));
    };
    if reason.is_none() {
        // Shutdown: no more deliveries; those already prefetched are given back.
        let _ = tokio::time::timeout(
            CLOSE_PATIENCE,
            state
                .channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
        let drain = async {
            while let Some(Ok(delivery)) = next(&mut consumer).await {
                unstarted.push(delivery);
            }
        };
        let _ = tokio::time::timeout(CLOSE_PATIENCE, drain).await;
        give_back(&shared, &state, &unstarted.iter().collect::<Vec<_>>()).await;
    }
    let closing = Closing {
        channel: state.channel.clone(),
        acker,
    };
    (reason.unwrap_or_else(|| "stopped".to_owned()), closing)
}

/// Gives deliveries that were not started back to their queue as fresh copies (published with
/// their properties and headers, then the originals acked): a requeue would mark them redelivered,
/// and a redelivered message is run alone, as a possible killer of its worker. If the copies
/// cannot be published, the originals are requeued after all.
pub(crate) async fn give_back(shared: &Shared, state: &QueueState, deliveries: &[&Delivery]) {
    if deliveries.is_empty() {
        return;
    }
    let tags: Vec<u64> = deliveries.iter().map(|d| d.delivery_tag).collect();
    let messages = deliveries
        .iter()
        .map(|delivery| Message {
            queue: state.name.clone(),
            properties: given_back(delivery),
            body: delivery.data.clone(),
            eta_ms: None,
        })
        .collect();
    let deadline = Instant::now() + CLOSE_PATIENCE;
    let published = shared.client.publish_batch(messages, deadline).await;
    for (tag, result) in tags.into_iter().zip(published) {
        match result {
            Ok(()) => state.acks.send(Settle::Ack(tag)),
            Err(error) => {
                tracing::debug!(%error, tag, "could not give a delivery back as a copy; requeueing it");
                state.acks.send(Settle::Requeue(tag));
            }
        }
    }
}

/// The properties of a given-back copy: the original's, without the broker's delivery count.
fn given_back(delivery: &Delivery) -> lapin::BasicProperties {
    let original = &delivery.properties;
    let mut properties = copy_properties(original);
    if let Some(mut headers) = original.headers().clone() {
        let mut map = headers.inner().clone();
        map.remove(crate::protocol::headers::header::DELIVERY_COUNT);
        headers = FieldTable::from(map);
        properties = properties.with_headers(headers);
    }
    if let Some(expiration) = original.expiration() {
        properties = properties.with_expiration(expiration.clone());
    }
    if let Some(mode) = original.delivery_mode() {
        properties = properties.with_delivery_mode(*mode);
    }
    properties
}

pub(crate) async fn drain(shared: &Shared, closings: Vec<Closing>) -> Result<(), Error> {
    let _ = shared.stopping.send(true);
    let running = shared.in_flight.count();
    if running > 0 {
        tracing::info!(running, grace = ?shared.settings.grace, "waiting for tasks in flight");
    }
    let finished = tokio::time::timeout(shared.settings.grace, shared.in_flight.idle())
        .await
        .is_ok();
    let running_at_expiry = shared.in_flight.count();
    if !finished {
        // Stop what still runs: each handler gives its delivery back (uncounted: this is not a
        // worker dying) before the channels close.
        let _ = shared.abandon.send(true);
        let _ = tokio::time::timeout(CLOSE_PATIENCE * 2, shared.in_flight.idle()).await;
    }
    close_all(closings).await;
    shared.observer.offline().await;
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
