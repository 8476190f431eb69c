//! [`Client`]: a connection to the broker that sends tasks and receives their replies.

use crate::error::{CallError, Error};
use crate::send::unix_ms;
use crate::topology;
use crate::wire;
use futures_core::Stream;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, Event,
    PublisherConfirm,
};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// The URL used when none is given: the local broker with RabbitMQ's default user.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The largest AMQP frame a client asks for unless its URL says otherwise (`?frame_max=`):
/// larger bodies travel in several frames; the connection's buffers stay small.
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// A handle on one broker connection: sends tasks (`.delay(&client)`, `.call(&client)`), and
/// is what a [`Worker`](crate::Worker) serves with. Cheap to clone; clones share the connection.
///
/// It owns one reply queue per connection, named by the client (`amqp-tasks.reply.<uuid>`,
/// exclusive, auto-delete). When the connection drops, every call waiting on it fails at once with
/// [`CallError::ConnectionLost`]; the next operation opens a new connection (with a new reply
/// queue).
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    config: ClientConfig,
    current: Mutex<Option<Arc<Session>>>,
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Clone, Debug)]
struct ClientConfig {
    url: String,
    namespace: Option<String>,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    connection_name: String,
}

/// Builds a [`Client`] with options: `Client::builder(url).namespace("staging").connect().await`.
#[derive(Debug)]
#[must_use]
pub struct ClientBuilder {
    config: ClientConfig,
}

impl ClientBuilder {
    /// Prefixes every queue name with `<namespace>.`, on both sides, to keep environments (or
    /// test runs) apart on one broker.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        self.config.namespace = (!namespace.is_empty()).then_some(namespace);
        self
    }

    /// How long `.delay()` waits for the broker's publisher confirm (default 30 s).
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.config.confirm_timeout = timeout;
        self
    }

    /// How long connecting may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// The connection name shown in RabbitMQ's management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.config.connection_name = name.into();
        self
    }

    /// Connects.
    pub async fn connect(self) -> Result<Client, Error> {
        if let Some(namespace) = &self.config.namespace {
            topology::check_name(namespace)
                .map_err(|e| Error::Config(format!("namespace: {e}")))?;
        }
        let client = Client {
            inner: Arc::new(ClientInner {
                config: self.config,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        };
        client
            .connect_session()
            .await
            .map_err(|source| Error::Connect {
                url: redact(&client.inner.config.url),
                source,
            })?;
        Ok(client)
    }
}

impl Client {
    /// Connects to `url` (`amqp://user:password@host:port/vhost`, the vhost URL-encoded: `%2f`
    /// for `/`).
    pub async fn connect(url: &str) -> Result<Client, Error> {
        Client::builder(url).connect().await
    }

    /// Connects to `AMQP_URL` (default [`DEFAULT_URL`]) with the namespace in
    /// `AMQP_TASKS_NAMESPACE`, if set.
    pub async fn from_env() -> Result<Client, Error> {
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let namespace = std::env::var("AMQP_TASKS_NAMESPACE").unwrap_or_default();
        Client::builder(url).namespace(namespace).connect().await
    }

    /// A builder for a client with options.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            config: ClientConfig {
                url: url.into(),
                namespace: None,
                confirm_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
                connection_name: format!(
                    "amqp-tasks {} pid {}",
                    std::env::args().next().unwrap_or_default(),
                    std::process::id()
                ),
            },
        }
    }

    /// The namespace prefixed to queue names, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.inner.config.namespace.as_deref()
    }

    /// The broker-side name of a task queue: `queue`, or `<namespace>.queue`.
    pub fn queue_name(&self, queue: &str) -> String {
        topology::queue_name(self.namespace(), queue)
    }

    /// The URL without its password, for logs.
    pub fn url_redacted(&self) -> String {
        redact(&self.inner.config.url)
    }

    pub(crate) fn confirm_timeout(&self) -> Duration {
        self.inner.config.confirm_timeout
    }

    /// Closes the connection; calls in flight fail with [`CallError::ConnectionLost`].
    pub async fn close(&self) {
        let session = self
            .inner
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(session) = session {
            session.close().await;
        }
    }

    /// The live session, opening a new one if there is none or it was lost.
    pub(crate) async fn session(&self) -> Result<Arc<Session>, CallError> {
        if let Some(session) = self.live_session() {
            return Ok(session);
        }
        self.connect_session().await.map_err(|e| {
            CallError::ConnectionLost(format!("cannot connect to {}: {e}", self.url_redacted()))
        })
    }

    fn live_session(&self) -> Option<Arc<Session>> {
        let current = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|s| s.is_alive()).cloned()
    }

    async fn connect_session(&self) -> Result<Arc<Session>, lapin::Error> {
        let _single_flight = self.inner.connecting.lock().await;
        if let Some(session) = self.live_session() {
            return Ok(session);
        }
        let config = &self.inner.config;
        let session = tokio::time::timeout(config.connect_timeout, Session::open(config))
            .await
            .map_err(|_| {
                lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection timed out",
                ))
            })??;
        tracing::debug!(url = %self.url_redacted(), reply_queue = %session.reply_queue, "connected");
        *self.inner.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.clone());
        Ok(session)
    }

    /// A live session, waiting for the broker (reconnecting with backoff) until `deadline`.
    async fn session_before(&self, deadline: Instant) -> Result<Arc<Session>, CallError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.session().await {
                Ok(session) => return Ok(session),
                Err(error) if Instant::now() + backoff >= deadline => return Err(error),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Publishes a task to `queue` (directly, or through the delay queues when its `eta` is
    /// ahead) with `mandatory`, and waits for the publisher confirm until `deadline`.
    pub(crate) async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        eta_ms: Option<u64>,
        deadline: Instant,
    ) -> Result<(), CallError> {
        tokio::time::timeout_at(deadline, async {
            let session = self.connected(deadline).await?;
            let (exchange, properties) = self.route(&session, queue, properties, eta_ms).await?;
            session
                .publish_confirmed(&exchange, queue, body, properties)
                .await
        })
        .await
        .unwrap_or(Err(CallError::Timeout))
    }

    /// The live session, or (boxed: the cold path keeps the hot future small) a new one.
    async fn connected(&self, deadline: Instant) -> Result<Arc<Session>, CallError> {
        match self.live_session() {
            Some(session) => Ok(session),
            None => Box::pin(self.session_before(deadline)).await,
        }
    }

    /// Publishes many tasks at once: every publish is handed over before the first confirm is
    /// awaited. One result per message, in order.
    pub(crate) async fn publish_batch(
        &self,
        messages: Vec<Outgoing>,
        deadline: Instant,
    ) -> Vec<Result<(), CallError>> {
        let connected = tokio::time::timeout_at(deadline, self.session_before(deadline)).await;
        let session = match connected.unwrap_or(Err(CallError::Timeout)) {
            Ok(session) => session,
            Err(error) => return messages.iter().map(|_| Err(error.clone())).collect(),
        };
        let mut started = Vec::with_capacity(messages.len());
        for message in messages {
            let routed = self
                .route(&session, &message.queue, message.properties, message.eta_ms)
                .await;
            let confirm = match routed {
                Ok((exchange, properties)) => session
                    .start_publish(&exchange, &message.queue, &message.body, properties)
                    .await
                    .map(|confirm| (confirm, exchange)),
                Err(error) => Err(error),
            };
            started.push((confirm, message.queue));
        }
        let mut results = Vec::with_capacity(started.len());
        for (confirm, queue) in started {
            results.push(match confirm {
                Ok((confirm, exchange)) => {
                    tokio::time::timeout_at(deadline, session.confirmed(confirm, &exchange, &queue))
                        .await
                        .unwrap_or(Err(CallError::Timeout))
                }
                Err(error) => Err(error),
            });
        }
        results
    }

    /// Publishes a request with `reply_to` and waits for its reply until `deadline`.
    pub(crate) async fn request(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        eta_ms: Option<u64>,
        deadline: Instant,
    ) -> Result<Reply, CallError> {
        tokio::time::timeout_at(deadline, async {
            let session = self.connected(deadline).await?;
            let pending = session.register()?;
            let properties = properties
                .with_reply_to(wire::short(&session.reply_queue))
                .with_correlation_id(wire::short(&pending.correlation.to_string()));
            let (exchange, properties) = self.route(&session, queue, properties, eta_ms).await?;
            session
                .publish_confirmed(&exchange, queue, body, properties)
                .await?;
            let mut pending = pending;
            (&mut pending.receiver)
                .await
                .map_err(|_| CallError::ConnectionLost(session.lost_reason()))
        })
        .await
        .unwrap_or(Err(CallError::Timeout))
    }

    /// The exchange to publish a task to: the default one, or the delay exchange (with the
    /// bucket header set) when its `eta` is at least the delay resolution away.
    async fn route(
        &self,
        session: &Session,
        queue: &str,
        properties: BasicProperties,
        eta_ms: Option<u64>,
    ) -> Result<(String, BasicProperties), CallError> {
        let wait = eta_ms.map(|eta| eta.saturating_sub(unix_ms(SystemTime::now())));
        match wait.and_then(topology::delay_bucket) {
            None => Ok((String::new(), properties)),
            Some(bucket) => Box::pin(self.route_delayed(session, queue, properties, bucket)).await,
        }
    }

    async fn route_delayed(
        &self,
        session: &Session,
        queue: &str,
        properties: BasicProperties,
        bucket: u64,
    ) -> Result<(String, BasicProperties), CallError> {
        let exchange = topology::delay_exchange(self.namespace());
        // A delayed message is routed by the broker later, when nobody is told about a missing
        // queue: check now that the task queue and the delay queues exist.
        session.ensure_exists(queue, Entity::Queue).await?;
        session.ensure_exists(&exchange, Entity::Exchange).await?;
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            topology::DELAY_BUCKET_HEADER.into(),
            AMQPValue::LongString(bucket.to_string().into()),
        );
        Ok((exchange, properties.with_headers(headers)))
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url_redacted())
            .field("namespace", &self.namespace())
            .finish()
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        if let Some(session) = self
            .current
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            session.retire("the client was dropped");
        }
    }
}

/// A task message ready to publish.
pub(crate) struct Outgoing {
    pub queue: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub eta_ms: Option<u64>,
}

/// A reply as received, decoded by the typed call.
#[derive(Debug)]
pub(crate) struct Reply {
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// One connection with its publisher channel (confirms on) and reply queue.
pub(crate) struct Session {
    pub connection: Connection,
    publisher: Channel,
    reply_queue: String,
    pending: Mutex<Pending>,
    /// Queues and exchanges known to exist (checked before a delayed publish).
    known: Mutex<HashSet<String>>,
    next_correlation: AtomicU64,
    lost: watch::Sender<Option<String>>,
}

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    lost: bool,
}

struct PendingReply {
    correlation: u64,
    receiver: oneshot::Receiver<Reply>,
    session: Arc<Session>,
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.session
            .lock_pending()
            .waiting
            .remove(&self.correlation);
    }
}

impl Session {
    async fn open(config: &ClientConfig) -> Result<Arc<Session>, lapin::Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(config.connection_name.clone().into());
        let mut uri: lapin::uri::AMQPUri = config.url.parse().map_err(|error: String| {
            lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, error))
        })?;
        // lapin keeps 32 frames of buffer per direction and connection, zero-filled: with
        // RabbitMQ's 128 KiB frames that is 8 MiB per connection, most of an idle worker.
        uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
        let connection = Connection::connect_uri(uri, properties).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;

        // Named here, fresh per connection: a broker-named (`amq.gen-…`) or reused name breaks
        // re-declaring it after a reconnect.
        let reply_queue = topology::queue_name(
            config.namespace.as_deref(),
            &format!("amqp-tasks.reply.{}", uuid::Uuid::new_v4().simple()),
        );
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
        let consumer = replies
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

        let (lost, _) = watch::channel(None);
        let session = Arc::new(Session {
            publisher,
            reply_queue,
            pending: Mutex::new(Pending::default()),
            known: Mutex::new(HashSet::new()),
            next_correlation: AtomicU64::new(1),
            lost,
            connection,
        });
        tokio::spawn(route_replies(
            Arc::downgrade(&session),
            consumer,
            session.lost.subscribe(),
        ));
        tokio::spawn(watch_connection(
            Arc::downgrade(&session),
            Box::pin(session.connection.events_listener()),
            session.lost.subscribe(),
        ));
        Ok(session)
    }

    pub fn is_alive(&self) -> bool {
        self.lost.borrow().is_none() && self.connection.status().connected()
    }

    /// Resolves once the session is lost, with the reason.
    pub async fn lost(&self) -> String {
        let mut receiver = self.lost.subscribe();
        match receiver.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "session dropped".to_owned(),
        }
    }

    pub fn lost_reason(&self) -> String {
        self.lost
            .borrow()
            .clone()
            .unwrap_or_else(|| "reply not received".to_owned())
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every call waiting on this session fails now, and new ones go to a new session.
    pub fn mark_lost(&self, reason: String) {
        if self.end(reason.clone()) {
            tracing::warn!(reason = %reason, "broker connection lost");
        }
    }

    /// Ends the session on purpose (closed or dropped client).
    fn retire(&self, reason: &str) {
        self.end(reason.to_owned());
    }

    /// Marks the session ended and fails every waiting call; true if it was not ended already.
    fn end(&self, reason: String) -> bool {
        let newly = self.lost.send_if_modified(|lost| {
            if lost.is_none() {
                *lost = Some(reason.clone());
                true
            } else {
                false
            }
        });
        let mut pending = self.lock_pending();
        pending.lost = true;
        pending.waiting.clear();
        newly
    }

    async fn close(&self) {
        self.retire("the client was closed");
        let _ = self
            .connection
            .close(200, "closed by amqp-tasks".into())
            .await;
    }

    fn register(self: &Arc<Self>) -> Result<PendingReply, CallError> {
        let correlation = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        let mut pending = self.lock_pending();
        if pending.lost {
            return Err(CallError::ConnectionLost(self.lost_reason()));
        }
        pending.waiting.insert(correlation, sender);
        Ok(PendingReply {
            correlation,
            receiver,
            session: self.clone(),
        })
    }

    fn deliver(&self, delivery: lapin::message::Delivery) {
        let correlation = delivery
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|id| id.as_str().parse::<u64>().ok());
        let sender = correlation.and_then(|c| self.lock_pending().waiting.remove(&c));
        match sender {
            Some(sender) => {
                let _ = sender.send(Reply {
                    kind: delivery
                        .properties
                        .kind()
                        .as_ref()
                        .map(|k| k.as_str().to_owned()),
                    content_type: delivery
                        .properties
                        .content_type()
                        .as_ref()
                        .map(|c| c.as_str().to_owned()),
                    body: delivery.data,
                });
            }
            // The caller gave up (timeout) before the answer came: nothing waits for it.
            None => {
                tracing::debug!(correlation_id = ?delivery.properties.correlation_id(), "late or unknown reply dropped")
            }
        }
    }

    /// Checks (once per session) that a queue or exchange exists, with a passive declare on a
    /// channel of its own (the broker closes a channel whose passive declare fails).
    async fn ensure_exists(&self, name: &str, entity: Entity) -> Result<(), CallError> {
        if self.lock_known().contains(name) {
            return Ok(());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| self.failed(e))?;
        let found = match entity {
            Entity::Queue => channel
                .queue_declare(
                    wire::short(name),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(drop),
            Entity::Exchange => channel
                .exchange_declare(
                    wire::short(name),
                    lapin::ExchangeKind::Headers,
                    lapin::options::ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(drop),
        };
        let _ = channel.close(200, "probe done".into()).await;
        match found {
            Ok(()) => {
                self.lock_known().insert(name.to_owned());
                Ok(())
            }
            Err(error) if is_not_found(&error) => Err(CallError::NoRoute {
                queue: name.to_owned(),
            }),
            Err(error) => Err(CallError::ConnectionLost(error.to_string())),
        }
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes with `mandatory` and awaits the confirm.
    pub async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), CallError> {
        let confirm = self
            .start_publish(exchange, routing_key, body, properties)
            .await?;
        self.confirmed(confirm, exchange, routing_key).await
    }

    /// Hands a `mandatory` publish to lapin; its confirm is awaited separately, so that many
    /// publishes can be in flight at once.
    async fn start_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, CallError> {
        self.publisher
            .basic_publish(
                wire::short(exchange),
                wire::short(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties,
            )
            .await
            .map_err(|e| self.failed(e))
    }

    async fn confirmed(
        &self,
        confirm: PublisherConfirm,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), CallError> {
        match confirm.await.map_err(|e| self.failed(e))? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                if returned.reply_code == 312 && exchange.is_empty() {
                    Err(CallError::NoRoute {
                        queue: routing_key.to_owned(),
                    })
                } else if returned.reply_code == 312 {
                    // The delay exchange without the bucket queue for this delay.
                    Err(CallError::NoRoute {
                        queue: format!("{exchange} (delay queues: start a worker to declare them)"),
                    })
                } else {
                    Err(CallError::Rejected(format!(
                        "returned by the broker: {}",
                        returned.reply_text
                    )))
                }
            }
            Confirmation::Nack(None) => Err(CallError::Rejected(
                "the broker nacked the message".to_owned(),
            )),
        }
    }

    fn failed(&self, error: lapin::Error) -> CallError {
        // Any failure of the publisher channel retires the session: the next operation gets a
        // fresh connection instead of a channel in an unknown state.
        self.mark_lost(error.to_string());
        CallError::ConnectionLost(error.to_string())
    }
}

#[derive(Clone, Copy)]
enum Entity {
    Queue,
    Exchange,
}

fn is_not_found(error: &lapin::Error) -> bool {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id() == 404,
        _ => false,
    }
}

pub(crate) async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

async fn route_replies(
    session: Weak<Session>,
    mut consumer: Consumer,
    mut lost: watch::Receiver<Option<String>>,
) {
    let ended = lost.wait_for(Option::is_some);
    tokio::pin!(ended);
    loop {
        tokio::select! {
            biased;
            item = next(&mut consumer) => {
                let Some(session) = session.upgrade() else { return };
                match item {
                    Some(Ok(delivery)) => session.deliver(delivery),
                    Some(Err(error)) => return session.mark_lost(format!("reply consumer: {error}")),
                    None => return session.mark_lost("the reply consumer was cancelled".to_owned()),
                }
            }
            _ = &mut ended => return,
        }
    }
}

async fn watch_connection(
    session: Weak<Session>,
    mut events: Pin<Box<dyn Stream<Item = Event> + Send>>,
    mut lost: watch::Receiver<Option<String>>,
) {
    loop {
        tokio::select! {
            event = next(&mut events) => match event {
                Some(Event::Error(error)) => {
                    if let Some(session) = session.upgrade() {
                        session.mark_lost(error.to_string());
                    }
                    return;
                }
                Some(_) => {}
                None => return,
            },
            _ = lost.wait_for(Option::is_some) => return,
        }
    }
}

/// `amqp://user:secret@host/` → `amqp://user:***@host/`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("amqp://user@host/"), "amqp://user@host/");
    }
}
