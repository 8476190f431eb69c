//! The baseline: a raw lapin program doing the same work as amqp-tasks with the same guarantees.
//!
//! - Queues: durable, `x-queue-type = classic` (what an amqp-tasks worker declares).
//! - Publishing: a channel in confirm mode, `mandatory`, the default exchange; `delay` messages are
//!   persistent (`delivery_mode` 2) and carry a `message_id` (the task id a caller gets back);
//!   requests are transient with an `expiration`, `reply_to` and `correlation_id`, and their
//!   confirm is awaited before the reply, as amqp-tasks does.
//! - Many sends: a window of publisher confirms in flight, awaited in order.
//! - Replies: one exclusive, auto-delete reply queue per client, named by the client, consumed with
//!   `no_ack` on a channel of its own; a map from correlation id to the waiting call.
//! - Consuming: manual acks, the same prefetch as the framework worker; the body is decoded with
//!   bincode (and the answer encoded) as the framework does; a reply is published on the
//!   delivery's channel before its ack. Acks go to one acker task per channel that acks each
//!   contiguous finished run of delivery tags with one `multiple = true` ack and finished tags
//!   beyond a gap one by one: the strategy of amqp-tasks' `worker/acker.rs`.
//!
//! Two more baselines, with fewer guarantees, show the ceilings the targets are set against:
//! - the *plain* RPC client ([`RawClient::connect_plain`]): the same requests on a channel that is
//!   not in confirm mode, so a call is one publish and one reply, nothing else;
//! - the *batched-ack* consumer ([`AckMode::Batch`]): persistent messages and publisher confirms as
//!   above, but the worker runs deliveries inline and acks with one `basic.ack` (`multiple =
//!   true`) every [`BATCH_ACK`] deliveries, plus a flush after [`BATCH_IDLE`] without a delivery
//!   so that the tail is acked.

use crate::Res;
use crate::tasks::progress;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The content type both sides send.
pub const CONTENT_TYPE: &str = "application/x-bincode";

/// How the raw worker runs a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dispatch {
    /// A tokio task per delivery, as the amqp-tasks worker does.
    Spawn,
    /// In the consumer loop, one delivery after the other.
    Inline,
}

impl Dispatch {
    /// The name used on the command line and in the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            Dispatch::Spawn => "spawn",
            Dispatch::Inline => "inline",
        }
    }
}

/// When the raw client's `call` looks at its request's publisher confirm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Confirm {
    /// Awaits the confirm, then the reply (the obvious raw lapin code).
    Await,
    /// Races the reply against the confirm, as amqp-tasks does: the reply ends the call at once,
    /// and a confirm still unresolved then is awaited in a task of its own (lapin keeps a dropped
    /// unresolved confirm until its channel ends).
    Race,
}

impl Confirm {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Confirm::Await => "await",
            Confirm::Race => "race",
        }
    }
}

/// What the raw side puts in a message besides the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// What a raw lapin program needs: `delivery_mode`, `content_type`, `message_id` (plus
    /// `reply_to`, `correlation_id` and `expiration` on requests).
    Minimal,
    /// Also amqp-tasks' properties and headers for a root task, same keys, types and sizes
    /// (`type`, and headers `task`, `signature`, plus `deadline` on requests; `type` on replies):
    /// separates the cost of the wire format from the cost of the code.
    Framework,
}

impl Wire {
    /// The name used on the command line and in the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            Wire::Minimal => "minimal",
            Wire::Framework => "framework",
        }
    }

    /// Adds what this wire format adds to a task message.
    fn dress(
        self,
        properties: BasicProperties,
        task: &str,
        deadline_ms: Option<u64>,
    ) -> BasicProperties {
        if self == Wire::Minimal {
            return properties;
        }
        // What amqp-tasks writes for a root task: the defaults (wire version 1, attempt 1, root
        // id = message id, no trace to continue) are left out.
        use amqp_tasks::wire::header;
        let mut headers = FieldTable::default();
        headers.insert(header::TASK.into(), AMQPValue::LongString(task.into()));
        headers.insert(
            header::SIGNATURE.into(),
            AMQPValue::LongString("0123456789abcdef".into()),
        );
        if let Some(deadline) = deadline_ms {
            headers.insert(
                header::DEADLINE.into(),
                AMQPValue::LongLongInt(deadline as i64),
            );
        }
        properties
            .with_type(amqp_tasks::wire::TYPE_CALL.into())
            .with_headers(headers)
    }
}

/// Deliveries per `multiple = true` ack of the batched-ack consumer.
pub const BATCH_ACK: u64 = 50;

/// How long the batched-ack consumer waits for a delivery before it acks what it has (the tail).
pub const BATCH_IDLE: Duration = Duration::from_millis(10);

/// How the raw worker acks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// The acker task of amqp-tasks' strategy (the same guarantees): contiguous finished runs.
    Acker,
    /// Inline deliveries, one `multiple = true` ack every [`BATCH_ACK`] (and on idle): the
    /// ceiling with full guarantees. Serves only [`batched_queue`].
    Batch,
}

impl AckMode {
    /// The name used in the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Acker => "acker",
            AckMode::Batch => "batch",
        }
    }
}

/// A unique message id without a system call per message (a UUID v4 from the OS costs one):
/// the raw side gets the same cheap ids amqp-tasks generates.
fn message_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| uuid::Uuid::new_v4().simple().to_string());
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The raw queue of the `delay` task in a namespace.
pub fn sink_queue(namespace: &str) -> String {
    format!("{namespace}.raw.sink")
}

/// The raw queue of the `call` task in a namespace.
pub fn echo_queue(namespace: &str) -> String {
    format!("{namespace}.raw.echo")
}

/// The raw queue of the batched-ack consumer in a namespace.
pub fn batched_queue(namespace: &str) -> String {
    format!("{namespace}.raw.batched")
}

/// `(payload,)` in bincode's standard configuration: the bytes amqp-tasks sends for `sink(payload)`.
pub fn encode_args(payload: &[u8]) -> Vec<u8> {
    bincode::serde::encode_to_vec((payload,), bincode::config::standard())
        .expect("a byte slice always encodes")
}

fn decode_args(body: &[u8]) -> Res<Vec<u8>> {
    let ((payload,), _): ((Vec<u8>,), usize) =
        bincode::serde::decode_from_slice(body, bincode::config::standard())?;
    Ok(payload)
}

fn classic() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    arguments
}

async fn next<S: futures_core::Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

// ------------------------------------------------------------------------------------------------
// Client

/// A raw lapin producer: a publisher channel (in confirm mode, unless plain) and a reply queue.
pub struct RawClient {
    connection: Connection,
    publisher: Channel,
    reply_queue: String,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>,
    next_correlation: AtomicU64,
    wire: Wire,
    confirms: bool,
    confirm: Confirm,
}

impl RawClient {
    /// Connects, opens the publisher channel in confirm mode and the reply queue and its
    /// consumer: the same guarantees as amqp-tasks.
    pub async fn connect(
        url: &str,
        namespace: &str,
        wire: Wire,
        confirm: Confirm,
    ) -> Res<RawClient> {
        let mut client = RawClient::open(url, namespace, wire, true).await?;
        client.confirm = confirm;
        Ok(client)
    }

    /// The plain RPC client: like [`RawClient::connect`], but the publisher channel is not in
    /// confirm mode, so a call does not wait for the broker to take the request. For calls only
    /// (`delay_many` needs confirms).
    pub async fn connect_plain(url: &str, namespace: &str, wire: Wire) -> Res<RawClient> {
        RawClient::open(url, namespace, wire, false).await
    }

    async fn open(url: &str, namespace: &str, wire: Wire, confirms: bool) -> Res<RawClient> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let publisher = connection.create_channel().await?;
        if confirms {
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        let reply_queue = format!("{namespace}.raw.reply.{}", uuid::Uuid::new_v4().simple());
        let replies = connection.create_channel().await?;
        replies
            .queue_declare(
                reply_queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut consumer = replies
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>> = Arc::default();
        let routes = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = next(&mut consumer).await {
                let correlation = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|c| c.as_str().parse::<u64>().ok());
                let waiting = correlation.and_then(|c| routes.lock().unwrap().remove(&c));
                if let Some(waiting) = waiting {
                    let _ = waiting.send(delivery.data);
                }
            }
        });
        Ok(RawClient {
            connection,
            publisher,
            reply_queue,
            pending,
            next_correlation: AtomicU64::new(1),
            wire,
            confirms,
            confirm: Confirm::Await,
        })
    }

    /// Publishes `n` persistent tasks to `queue` with `window` confirms in flight; returns once
    /// every one is confirmed.
    pub async fn delay_many(
        &self,
        queue: &str,
        n: usize,
        window: usize,
        payload: &[u8],
        confirm_timeout: Duration,
    ) -> Res<()> {
        if !self.confirms {
            return Err("delay_many needs a client in confirm mode".into());
        }
        let mut in_flight = VecDeque::with_capacity(window);
        for _ in 0..n {
            if in_flight.len() >= window {
                let confirm = in_flight.pop_front().expect("the window is not empty");
                check(tokio::time::timeout(confirm_timeout, confirm).await??)?;
            }
            let body = encode_args(payload);
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(CONTENT_TYPE.into())
                .with_message_id(message_id().into());
            let properties = self.wire.dress(properties, "bench.sink", None);
            let confirm = self
                .publisher
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    properties,
                )
                .await?;
            in_flight.push_back(confirm);
        }
        for confirm in in_flight {
            check(tokio::time::timeout(confirm_timeout, confirm).await??)?;
        }
        Ok(())
    }

    /// One request/reply round trip: publish the request (and await its confirm, unless the
    /// client is plain), await the answer.
    pub async fn call(&self, queue: &str, payload: &[u8], timeout: Duration) -> Res<u64> {
        let correlation = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.pending.lock().unwrap().insert(correlation, sender);
        let result = tokio::time::timeout(timeout, async {
            let body = encode_args(payload);
            let properties = BasicProperties::default()
                .with_delivery_mode(1)
                .with_content_type(CONTENT_TYPE.into())
                .with_message_id(message_id().into())
                .with_expiration(timeout.as_millis().to_string().into())
                .with_reply_to(self.reply_queue.as_str().into())
                .with_correlation_id(correlation.to_string().into());
            let deadline = unix_ms() + timeout.as_millis() as u64;
            let properties = self.wire.dress(properties, "bench.echo", Some(deadline));
            let confirm = self
                .publisher
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    properties,
                )
                .await?;
            let reply = match (self.confirms, self.confirm) {
                (false, _) => receiver.await?,
                (true, Confirm::Await) => {
                    check(confirm.await?)?;
                    receiver.await?
                }
                (true, Confirm::Race) => {
                    let mut confirm = confirm;
                    let mut receiver = receiver;
                    tokio::select! {
                        biased;
                        reply = &mut receiver => {
                            tokio::spawn(async move {
                                let _ = confirm.await;
                            });
                            reply?
                        }
                        confirmed = &mut confirm => {
                            check(confirmed?)?;
                            receiver.await?
                        }
                    }
                }
            };
            let (length, _): (u64, usize) =
                bincode::serde::decode_from_slice(&reply, bincode::config::standard())?;
            Ok::<u64, crate::Error>(length)
        })
        .await;
        match result {
            Ok(answer) => answer,
            Err(_) => {
                self.pending.lock().unwrap().remove(&correlation);
                Err("raw call timed out".into())
            }
        }
    }

    /// Closes the connection (its reply queue goes with it).
    pub async fn close(&self) {
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

fn check(confirmation: Confirmation) -> Res<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(format!("returned by the broker: {}", returned.reply_text).into())
        }
        Confirmation::Nack(None) => Err("nacked by the broker".into()),
        Confirmation::NotRequested => Err("the channel is not in confirm mode".into()),
    }
}

// ------------------------------------------------------------------------------------------------
// Worker

/// The raw worker process: `AMQP_URL`, `AMQP_TASKS_BENCH_NAMESPACE`, `AMQP_TASKS_BENCH_PREFETCH`,
/// `AMQP_TASKS_BENCH_DISPATCH`, `AMQP_TASKS_BENCH_ACK` (`acker` or `batch`); consumes both raw
/// queues (with `batch`: the batched-ack queue only) until SIGTERM or SIGINT.
pub fn worker_main() -> std::process::ExitCode {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| amqp_tasks::DEFAULT_URL.to_owned());
    let namespace = std::env::var("AMQP_TASKS_BENCH_NAMESPACE").unwrap_or_else(|_| "bench".into());
    let prefetch = std::env::var("AMQP_TASKS_BENCH_PREFETCH")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(64);
    let dispatch = match std::env::var("AMQP_TASKS_BENCH_DISPATCH").as_deref() {
        Ok("inline") => Dispatch::Inline,
        _ => Dispatch::Spawn,
    };
    let wire = match std::env::var("AMQP_TASKS_BENCH_WIRE").as_deref() {
        Ok("framework") => Wire::Framework,
        _ => Wire::Minimal,
    };
    let ack = match std::env::var("AMQP_TASKS_BENCH_ACK").as_deref() {
        Ok("batch") => AckMode::Batch,
        _ => AckMode::Acker,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(serve(&url, &namespace, prefetch, dispatch, wire, ack));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("raw worker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy)]
enum Job {
    Sink,
    Echo,
}

async fn serve(
    url: &str,
    namespace: &str,
    prefetch: u16,
    dispatch: Dispatch,
    wire: Wire,
    ack: AckMode,
) -> Res<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut consumers = Vec::new();
    let queues = match ack {
        AckMode::Acker => vec![
            (sink_queue(namespace), Job::Sink),
            (echo_queue(namespace), Job::Echo),
        ],
        AckMode::Batch => vec![(batched_queue(namespace), Job::Sink)],
    };
    for (queue, job) in queues {
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                classic(),
            )
            .await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(match ack {
            AckMode::Acker => {
                let acks = spawn_acker(channel.clone());
                tokio::spawn(consume(channel, consumer, acks, job, dispatch, wire))
            }
            AckMode::Batch => tokio::spawn(consume_batched(channel, consumer, job, wire)),
        });
    }
    eprintln!(
        "raw worker ready (prefetch {prefetch}, dispatch {dispatch:?}, wire {wire:?}, acks {})",
        ack.as_str()
    );
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = connection.close(200, "raw worker stopping".into()).await;
    Ok(())
}

async fn consume(
    channel: Channel,
    mut consumer: Consumer,
    acks: mpsc::UnboundedSender<u64>,
    job: Job,
    dispatch: Dispatch,
    wire: Wire,
) {
    while let Some(Ok(delivery)) = next(&mut consumer).await {
        match dispatch {
            Dispatch::Inline => {
                handle(&channel, &delivery, job, wire).await;
                let _ = acks.send(delivery.delivery_tag);
            }
            Dispatch::Spawn => {
                let channel = channel.clone();
                let acks = acks.clone();
                tokio::spawn(async move {
                    handle(&channel, &delivery, job, wire).await;
                    let _ = acks.send(delivery.delivery_tag);
                });
            }
        }
    }
}

/// Runs deliveries inline and acks them with one `multiple = true` ack every [`BATCH_ACK`], and
/// whatever is unacked after [`BATCH_IDLE`] without a delivery.
async fn consume_batched(channel: Channel, mut consumer: Consumer, job: Job, wire: Wire) {
    let mut unacked = 0u64;
    let mut last_tag = 0u64;
    loop {
        let delivery = if unacked == 0 {
            next(&mut consumer).await
        } else {
            match tokio::time::timeout(BATCH_IDLE, next(&mut consumer)).await {
                Ok(delivery) => delivery,
                Err(_idle) => {
                    let _ = channel
                        .basic_ack(last_tag, BasicAckOptions { multiple: true })
                        .await;
                    unacked = 0;
                    continue;
                }
            }
        };
        let Some(Ok(delivery)) = delivery else { break };
        handle(&channel, &delivery, job, wire).await;
        last_tag = delivery.delivery_tag;
        unacked += 1;
        if unacked >= BATCH_ACK {
            let _ = channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await;
            unacked = 0;
        }
    }
}

async fn handle(channel: &Channel, delivery: &lapin::message::Delivery, job: Job, wire: Wire) {
    let payload = match decode_args(&delivery.data) {
        Ok(payload) => payload,
        Err(error) => {
            eprintln!("raw worker: bad body: {error}");
            return;
        }
    };
    match job {
        Job::Sink => {
            std::hint::black_box(&payload);
            progress::done();
        }
        Job::Echo => {
            let answer = payload.len() as u64;
            let body = bincode::serde::encode_to_vec(answer, bincode::config::standard())
                .expect("a u64 always encodes");
            let Some(reply_to) = delivery.properties.reply_to() else {
                return;
            };
            let mut properties = BasicProperties::default().with_content_type(CONTENT_TYPE.into());
            if let Some(correlation) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(correlation.clone());
            }
            if wire == Wire::Framework {
                properties = properties.with_type(amqp_tasks::wire::TYPE_RESULT.into());
            }
            if let Err(error) = channel
                .basic_publish(
                    "".into(),
                    reply_to.clone(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
            {
                eprintln!("raw worker: reply not sent: {error}");
            }
        }
    }
}

/// One acker per channel: a contiguous finished run is one `multiple` ack, a finished tag beyond a
/// gap is acked alone (as amqp-tasks' acker does).
fn spawn_acker(channel: Channel) -> mpsc::UnboundedSender<u64> {
    let (sender, mut receiver) = mpsc::unbounded_channel::<u64>();
    tokio::spawn(async move {
        let mut settled_through = 0u64;
        let mut finished = BTreeSet::new();
        let mut alone = BTreeSet::new();
        let mut batch = Vec::new();
        while receiver.recv_many(&mut batch, 1024).await > 0 {
            finished.extend(batch.drain(..).filter(|tag| *tag > settled_through));
            let mut through = None;
            loop {
                let next = settled_through + 1;
                if finished.remove(&next) {
                    through = Some(next);
                } else if !alone.remove(&next) {
                    break;
                }
                settled_through = next;
            }
            if let Some(tag) = through {
                let _ = channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await;
            }
            for tag in std::mem::take(&mut finished) {
                let _ = channel
                    .basic_ack(tag, BasicAckOptions { multiple: false })
                    .await;
                alone.insert(tag);
            }
        }
    });
    sender
}
