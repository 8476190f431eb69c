//! The scheduler of periodic tasks (`worker --beat`): a candidate that the broker may elect
//! active, and what the active one does. It owns the election (one token message in the quorum,
//! single-active-consumer queue [`beat_queue`]), firing the ticks that are due as ordinary task
//! messages, and handing the token on; the arithmetic (when a schedule ticks, tick ids, the
//! catch-up rule, the token's content) is `protocol::schedule`'s.
//!
//! - Any number of workers may be candidates. Each consumes the election queue (manual acks); the
//!   broker delivers to one consumer at a time, and AMQP never says which: the candidate that
//!   holds a token delivery is the active scheduler.
//! - A candidate that finds no token ready when it starts seeds one. Two seeding at once make two
//!   tokens: both go to the one active consumer, which merges them (the later tick of each task)
//!   and acks both after its next publish, so duplicates collapse into one.
//! - After each step (ticks fired, or at least every [`REFRESH`] with nothing due, well within
//!   `consumer_timeout`), the active scheduler publishes the next token (confirmed), carrying the
//!   last tick of each task, then acks the token(s) it held. Killed or cut off, it loses the
//!   token back to the queue and the next candidate continues where the token says: at worst it
//!   fires again the ticks fired after the last token (same ids).
//! - Its connection asks for a heartbeat every [`HEARTBEAT`] seconds at most, so that a silent
//!   network loss hands the token on within seconds.

use crate::client::call::ceiling;
use crate::client::{Client, DynamicCall};
use crate::error::Error;
use crate::protocol::schedule::{Plan, Token, tick_id};
use crate::protocol::topology::beat_queue;
use crate::protocol::unix_ms;
use crate::transport::next;
use crate::transport::topology::declare_beat_queue;
use crate::worker::control::{Control, SchedulerRole};
use crate::worker::registry::Registration;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// The longest heartbeat interval a scheduler's connection asks for, in seconds.
pub(crate) const HEARTBEAT: u16 = 5;
/// The active scheduler publishes a fresh token at least this often, ticks due or not.
pub(crate) const REFRESH: Duration = Duration::from_secs(60);
/// On becoming active, how long it waits for more tokens (duplicates, or the newer token a dead
/// scheduler published before acking the old one) before its first step.
const GATHER: Duration = Duration::from_millis(200);
/// Publishes of a token the broker nacks before the scheduler gives the token up.
const TOKEN_ATTEMPTS: u32 = 3;
/// Deliveries a candidate may hold: every duplicate token reaches the active one.
const PREFETCH: u16 = 32;

/// A periodic task this worker schedules.
pub(crate) struct Planned {
    task: &'static Registration,
    plan: Plan,
}

/// The periodic tasks among `tasks`, their schedules checked (a cron expression croner refuses
/// is a start-up error naming the task).
pub(crate) fn plans(tasks: &[&'static Registration]) -> Result<Vec<Planned>, Error> {
    tasks
        .iter()
        .filter_map(|task| task.schedule().map(|schedule| (task, schedule)))
        .map(|(task, schedule)| {
            schedule
                .plan()
                .map(|plan| Planned { task, plan })
                .map_err(|e| Error::Config(format!("schedule of task `{}`: {e}", task.name())))
        })
        .collect()
}

/// How a candidate's session ended.
enum Ended {
    Stopped,
    Lost(String),
}

/// Runs a candidate until `stop` turns true: connects (again after a loss, with backoff),
/// consumes the election queue and, while it holds the token, fires the due ticks. `client` is
/// the scheduler's own (short heartbeat); it is closed on the way out, which hands the token on.
pub(crate) async fn run(
    client: Client,
    plans: Vec<Planned>,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
) {
    let mut memory = Token::default();
    let mut attempt = 0;
    let who = format!("pid {}", std::process::id());
    control.set_scheduler(SchedulerRole::Candidate);
    loop {
        let stopping = *stop.borrow();
        if stopping {
            break;
        }
        let session = tokio::select! {
            session = client.session() => session,
            () = stopped(&mut stop) => break,
        };
        let ended = match session {
            Ok(session) => {
                // A candidate that ran a while starts its backoff afresh when it ends.
                let started = tokio::time::Instant::now();
                let lost = session.clone();
                let ended = tokio::select! {
                    ended = candidate(&client, &session.connection, &plans, &mut memory, &who, &control, &mut stop) => ended,
                    reason = lost.lost() => Ended::Lost(reason),
                };
                if started.elapsed() > REFRESH {
                    attempt = 0;
                }
                ended
            }
            Err(error) => Ended::Lost(error.to_string()),
        };
        // The token went back with the session (or the candidate stops).
        control.set_scheduler(SchedulerRole::Candidate);
        match ended {
            Ended::Stopped => break,
            Ended::Lost(reason) => {
                attempt += 1;
                let delay = crate::protocol::retry::RetryPolicy::RECONNECT.delay(attempt);
                tracing::warn!(%reason, retry_in = ?delay, "beat: scheduler candidate lost its session");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => break,
                }
            }
        }
    }
    control.set_scheduler(SchedulerRole::None);
    client.close().await;
    tracing::info!("beat: scheduler candidate stopped");
}

async fn candidate(
    client: &Client,
    connection: &lapin::Connection,
    plans: &[Planned],
    memory: &mut Token,
    who: &str,
    control: &Control,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let queue = beat_queue(client.namespace());
    let lost = |what: &str| {
        let what = what.to_owned();
        move |error: lapin::Error| Ended::Lost(format!("{what}: {error}"))
    };
    let opened = async {
        let channel = connection
            .create_channel()
            .await
            .map_err(lost("opening the election channel"))?;
        channel
            .confirm_select(Default::default())
            .await
            .map_err(lost("turning confirms on"))?;
        let declared = declare_beat_queue(&channel, &queue)
            .await
            .map_err(lost(&format!("declaring `{queue}`")))?;
        if declared.message_count() == 0 {
            // No token waiting: seed one (a duplicate, if another holds it, collapses).
            publish_token(&channel, &queue, memory, who).await?;
            tracing::debug!(queue = %queue, "beat: seeded a token");
        }
        channel
            .basic_qos(PREFETCH, BasicQosOptions { global: false })
            .await
            .map_err(lost("setting the prefetch"))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lost(&format!("consuming `{queue}`")))?;
        Ok::<_, Ended>((channel, consumer))
    };
    let (channel, mut consumer) = match opened.await {
        Ok(opened) => opened,
        Err(ended) => return ended,
    };
    tracing::info!(queue = %queue, tasks = plans.len(), "beat: scheduler candidate waiting for the token");
    let ended = elected(
        client,
        &channel,
        &mut consumer,
        &queue,
        plans,
        memory,
        who,
        control,
        stop,
    )
    .await;
    // Closing the channel returns the token held, unacked, to the next candidate.
    let _ = channel
        .close(200, "scheduler candidate stopping".into())
        .await;
    ended
}

/// Consumes the election queue; while it holds a token, runs the schedule.
#[allow(clippy::too_many_arguments)]
async fn elected(
    client: &Client,
    channel: &Channel,
    consumer: &mut lapin::Consumer,
    queue: &str,
    plans: &[Planned],
    memory: &mut Token,
    who: &str,
    control: &Control,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let mut held: Vec<Delivery> = Vec::new();
    let mut active = false;
    let mut published_at = tokio::time::Instant::now();
    loop {
        let wake = (!held.is_empty()).then(|| wake_at(plans, memory, published_at));
        tokio::select! {
            delivery = next(consumer) => {
                let delivery = match delivery {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => return Ended::Lost(format!("election consumer: {error}")),
                    None => return Ended::Lost("the election consumer was cancelled".to_owned()),
                };
                take(delivery, &mut held, memory);
                if !active {
                    active = true;
                    // Tokens a dead scheduler left behind come together: gather them first.
                    let gather = tokio::time::sleep(GATHER);
                    tokio::pin!(gather);
                    loop {
                        tokio::select! {
                            () = &mut gather => break,
                            more = next(consumer) => match more {
                                Some(Ok(delivery)) => take(delivery, &mut held, memory),
                                Some(Err(error)) => return Ended::Lost(format!("election consumer: {error}")),
                                None => return Ended::Lost("the election consumer was cancelled".to_owned()),
                            },
                        }
                    }
                    control.set_scheduler(SchedulerRole::Active);
                    tracing::info!(
                        tokens = held.len(),
                        last = ?memory.last,
                        "beat: this worker is the active scheduler"
                    );
                    if let Err(ended) = step(client, channel, queue, plans, memory, who, &mut held, &mut published_at, true).await {
                        return ended;
                    }
                }
            }
            () = sleep_until(wake) => {
                if let Err(ended) = step(client, channel, queue, plans, memory, who, &mut held, &mut published_at, false).await {
                    return ended;
                }
            }
            () = stopped(stop) => {
                if active {
                    tracing::info!("beat: handed the scheduler token on");
                }
                return Ended::Stopped;
            }
        }
    }
}

/// Keeps a delivery of the election queue: a token is merged into what this scheduler knows;
/// anything else is held too, and acked (dropped) with the next token.
fn take(delivery: Delivery, held: &mut Vec<Delivery>, memory: &mut Token) {
    match Token::decode(&delivery.data) {
        Some(token) => memory.merge(&token),
        None => tracing::warn!(
            bytes = delivery.data.len(),
            "beat: a message that is not a scheduler token in the election queue; dropping it"
        ),
    }
    held.push(delivery);
}

/// When the active scheduler next has something to do: the first tick due, or the refresh.
fn wake_at(
    plans: &[Planned],
    memory: &Token,
    published_at: tokio::time::Instant,
) -> tokio::time::Instant {
    let now_ms = unix_ms(SystemTime::now());
    let refresh = published_at + REFRESH;
    let due = plans
        .iter()
        .filter_map(|planned| {
            let last = memory.last.get(planned.task.name()).copied();
            match planned.plan.latest_until(now_ms) {
                // A tick after the last one recorded (or none recorded): a step is due now.
                Some(latest) if last.is_none_or(|last| latest > last) => Some(now_ms),
                _ => planned.plan.next_after(now_ms),
            }
        })
        .min();
    match due {
        Some(due_ms) => {
            let at =
                tokio::time::Instant::now() + Duration::from_millis(due_ms - now_ms.min(due_ms));
            at.min(refresh)
        }
        None => refresh,
    }
}

/// Resolves once `stop` is true (its guard dropped: a scheduler's future stays `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn sleep_until(wake: Option<tokio::time::Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One step of the active scheduler: fires the ticks due, then (if anything changed, on the
/// first step, or for the refresh) publishes the next token, confirmed, and acks those held.
#[allow(clippy::too_many_arguments)]
async fn step(
    client: &Client,
    channel: &Channel,
    queue: &str,
    plans: &[Planned],
    memory: &mut Token,
    who: &str,
    held: &mut Vec<Delivery>,
    published_at: &mut tokio::time::Instant,
    first: bool,
) -> Result<(), Ended> {
    let now_ms = unix_ms(SystemTime::now());
    let mut changed = false;
    for planned in plans {
        let name = planned.task.name();
        let decision = planned.plan.step(memory.last.get(name).copied(), now_ms);
        if let Some(tick) = decision.fire {
            fire(client, planned.task, tick).await?;
        }
        if let Some(recorded) = decision.record {
            if decision.fire.is_none() {
                tracing::info!(
                    task = name,
                    tick = recorded,
                    "beat: tick missed, not fired (catch_up)"
                );
            }
            memory.last.insert(name.to_owned(), recorded);
            changed = true;
        }
    }
    let refresh = published_at.elapsed() >= REFRESH;
    if !(changed || first || refresh || held.len() > 1) {
        return Ok(());
    }
    publish_token(channel, queue, memory, who).await?;
    *published_at = tokio::time::Instant::now();
    for delivery in held.drain(..) {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| Ended::Lost(format!("acking the previous token: {e}")))?;
    }
    Ok(())
}

/// Sends one tick: an ordinary task message with no arguments and the tick's id, confirmed.
async fn fire(client: &Client, task: &Registration, tick: u64) -> Result<(), Ended> {
    let id = tick_id(task.name(), tick);
    let sent = DynamicCall::new(task.name(), serde_json::json!({}))
        .queue(task.queue())
        .task_id(id.as_str())
        .timeout(ceiling(task.timeout(), task.retries(), task.backoff()))
        .delay(client)
        .await;
    match sent {
        Ok(_) => {
            tracing::debug!(task = task.name(), id = %id, "beat: tick sent");
            Ok(())
        }
        // No queue for it (deleted, or not declared yet): this tick cannot be delivered, and
        // giving the token up would not help the next scheduler.
        Err(error @ crate::CallError::NoRoute { .. }) => {
            tracing::warn!(task = task.name(), id = %id, %error, "beat: tick not sent");
            Ok(())
        }
        Err(error) => Err(Ended::Lost(format!("sending the tick {id}: {error}"))),
    }
}

async fn publish_token(
    channel: &Channel,
    queue: &str,
    memory: &Token,
    who: &str,
) -> Result<(), Ended> {
    let token = Token {
        last: memory.last.clone(),
        by: who.to_owned(),
        at_ms: unix_ms(SystemTime::now()),
    };
    // A nack (a quorum queue still electing its leader) leaves the held token in force: try
    // again a few times before giving the token up.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &token.encode(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await
            .map_err(|e| Ended::Lost(format!("publishing the token: {e}")))?;
        match confirm.await {
            Ok(Confirmation::Ack(_)) => return Ok(()),
            Ok(other) if attempt >= TOKEN_ATTEMPTS => {
                return Err(Ended::Lost(format!(
                    "the broker did not confirm the token: {other:?}"
                )));
            }
            Ok(other) => {
                tracing::debug!(?other, attempt, "beat: token not confirmed; again");
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
            }
            Err(error) => return Err(Ended::Lost(format!("publishing the token: {error}"))),
        }
    }
}
