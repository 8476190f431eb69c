//! One broker session: a connection with its publisher channel (confirms on) and its reply queue,
//! and how it ends (lost, retired, closed), which fails every call waiting on it at once. A new
//! session is a new connection with a new reply queue; the [`Broker`](super::Broker) decides when.

use super::replies::{self, Pending};
use super::url;
use super::{BrokerConfig, next};
use crate::protocol::topology;
use futures_core::Stream;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::watch;

/// One connection with its publisher channel (confirms on) and reply queue.
pub(crate) struct Session {
    pub(crate) connection: Connection,
    pub(super) publisher: Channel,
    pub(crate) reply_queue: String,
    pub(super) pending: Mutex<Pending>,
    /// Queues and exchanges known to exist (checked before a delayed publish).
    pub(super) known: Mutex<HashSet<String>>,
    pub(super) next_correlation: AtomicU64,
    /// Prefixes this session's correlation ids: random, so that nobody who has not seen a request
    /// can forge a reply to it.
    pub(super) correlation_secret: String,
    pub(super) lost: watch::Sender<Option<String>>,
}

impl Session {
    pub(crate) async fn open(config: &BrokerConfig) -> Result<Arc<Session>, lapin::Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(config.connection_name.clone().into());
        let uri = url::parse(&config.url).map_err(|error| {
            lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, error))
        })?;
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
