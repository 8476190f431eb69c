//! One broker session: a connection with its publisher channel (confirms on) and its reply queue,
//! and how it ends (lost, retired, closed), which fails every call waiting on it at once. A new
//! session is a new connection with a new reply queue; the [`Broker`](super::Broker) decides when.

use super::replies::{self, Pending};
use super::tls::Tls;
use super::url::Endpoint;
use super::{BrokerConfig, next};
use crate::protocol::topology;
use futures_core::Stream;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, Weak};
use tokio::sync::watch;

/// One connection with its publisher channel (confirms on) and reply queue.
pub(crate) struct Session {
    pub(crate) connection: Connection,
    /// Replaced by a fresh channel when the broker nacks a publish (see
    /// [`Session::renew_publisher`]).
    pub(super) publisher: RwLock<Channel>,
    /// Held while a publisher channel is replaced; when it last was.
    pub(super) renewal: tokio::sync::Mutex<Option<std::time::Instant>>,
    pub(crate) reply_queue: String,
    pub(super) pending: Mutex<Pending>,
    /// Queues and exchanges known to exist (checked before a delayed publish).
    pub(super) known: Mutex<HashSet<String>>,
    /// Those known not to (only where absence chooses between two, not an error).
    pub(super) absent: Mutex<HashSet<String>>,
    pub(super) next_correlation: AtomicU64,
    /// Prefixes this session's correlation ids: random, so that nobody who has not seen a request
    /// can forge a reply to it.
    pub(super) correlation_secret: String,
    pub(super) lost: watch::Sender<Option<String>>,
    /// The node's URL, password redacted.
    pub(crate) url: String,
}

impl Session {
    pub(crate) async fn open(
        config: &BrokerConfig,
        endpoint: &Endpoint,
    ) -> Result<Arc<Session>, lapin::Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(config.connection_name.clone().into());
        let connection = match &endpoint.tls {
            None => Connection::connect_uri(endpoint.uri.clone(), properties).await?,
            Some(tls) => connect_tls(endpoint, tls, properties).await?,
        };
        let publisher = open_publisher(&connection).await?;

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
            publisher: RwLock::new(publisher),
            renewal: tokio::sync::Mutex::new(None),
            reply_queue,
            pending: Mutex::new(Pending::default()),
            known: Mutex::new(HashSet::new()),
            absent: Mutex::new(HashSet::new()),
            next_correlation: AtomicU64::new(1),
            url: endpoint.shown.clone(),
            correlation_secret: uuid::Uuid::new_v4().simple().to_string(),
            lost,
            connection,
        });
        tokio::spawn(replies::route_replies(
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

    /// The channel publishes go to now.
    pub(super) fn publisher(&self) -> Channel {
        self.publisher
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the publisher channel that had a publish nacked, unless that was done already
    /// (or less than a second ago). Why: a RabbitMQ channel keeps, per quorum queue, the state of
    /// its enqueuer; after a leader change during a node's restart that state can stay stuck,
    /// and the channel then has every publish to that queue nacked (measured on 3.10: minutes),
    /// while a fresh channel on the same connection is taken at once. The old channel is closed
    /// once publishes still in flight on it have had their confirms.
    pub(super) async fn renew_publisher(&self, nacked: &Channel) {
        const RENEWAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
        let mut renewal = self.renewal.lock().await;
        if self.publisher().id() != nacked.id()
            || renewal.is_some_and(|at| at.elapsed() < RENEWAL_INTERVAL)
        {
            return;
        }
        *renewal = Some(std::time::Instant::now());
        let opened = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            open_publisher(&self.connection),
        )
        .await;
        let fresh = match opened {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not open a fresh publisher channel");
                return;
            }
            Err(_) => {
                tracing::warn!("opening a fresh publisher channel timed out");
                return;
            }
        };
        tracing::debug!(
            old = nacked.id(),
            new = fresh.id(),
            "publisher channel replaced after a nack"
        );
        let old = std::mem::replace(
            &mut *self.publisher.write().unwrap_or_else(|e| e.into_inner()),
            fresh,
        );
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                old.close(200, "replaced".into()),
            )
            .await;
        });
    }

    /// The negotiated `frame_max`: what one content-header frame (properties and headers) of
    /// this connection can hold.
    pub(crate) fn frame_max(&self) -> u32 {
        self.connection.configuration().frame_max()
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.lost.borrow().is_none() && self.connection.status().connected()
    }

    /// Resolves once the session is lost, with the reason.
    pub(crate) async fn lost(&self) -> String {
        let mut receiver = self.lost.subscribe();
        match receiver.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "session dropped".to_owned(),
        }
    }

    pub(crate) fn lost_reason(&self) -> String {
        self.lost
            .borrow()
            .clone()
            .unwrap_or_else(|| "reply not received".to_owned())
    }

    pub(super) fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every call waiting on this session fails now, and new ones go to a new session.
    pub(crate) fn mark_lost(&self, reason: String) {
        if self.end(reason.clone()) {
            tracing::warn!(reason = %reason, "broker connection lost");
        }
    }

    /// Ends the session on purpose (closed or dropped client).
    pub(crate) fn retire(&self, reason: &str) {
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

    pub(crate) async fn close(&self) {
        self.retire("the client was closed");
        let _ = self
            .connection
            .close(200, "closed by amqp-tasks".into())
            .await;
    }
}

/// A channel with publisher confirms on.
async fn open_publisher(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Connects over TLS with this crate's rustls configuration (lapin's own TLS settings cannot say
/// `verify_none` or another server name).
async fn connect_tls(
    endpoint: &Endpoint,
    tls: &Tls,
    properties: ConnectionProperties,
) -> Result<Connection, lapin::Error> {
    if tls.unverified {
        tracing::warn!(url = %endpoint.shown, "verify=verify_none: the broker's certificate is not checked");
    }
    let runtime = lapin::runtime::default_runtime()?;
    let connector = RustlsConnector::from(tls.config.clone());
    let server_name = tls.server_name.clone();
    Connection::connector(
        endpoint.uri.clone(),
        runtime,
        async move |uri: AMQPUri, runtime| {
            let address = runtime.to_socket_addrs((uri.authority.host.clone(), uri.authority.port));
            let stream = AsyncTcpStream::connect(&runtime, address).await?;
            let stream = stream.into_rustls(&connector, &server_name).await?;
            Ok(stream)
        },
        properties,
    )
    .await
}

pub(super) async fn watch_connection(
    session: Weak<Session>,
    mut events: Pin<Box<dyn Stream<Item = Event> + Send>>,
    mut lost: watch::Receiver<Option<String>>,
) {
    loop {
        tokio::select! {
            event = next(&mut events) => match event {
                Some(Event::Error(error)) => {
                    let Some(session) = session.upgrade() else { return };
                    // lapin reports a channel closed by the broker (a passive declare of a queue
                    // that does not exist, say) here too: only a connection error ends the session.
                    if !session.connection.status().connected() {
                        session.mark_lost(error.to_string());
                        return;
                    }
                    tracing::debug!(%error, "a channel was closed by the broker");
                }
                Some(_) => {}
                None => return,
            },
            _ = lost.wait_for(Option::is_some) => return,
        }
    }
}
