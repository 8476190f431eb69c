//! Probes: whether a queue or exchange exists (a passive declare on a channel of its own, since
//! the broker closes a channel whose passive declare fails), what a queue holds, and the one test
//! for a "not found" broker error.

use super::session::Session;
use crate::error::CallError;
use crate::protocol::short;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

/// What a probe looks for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Entity {
    Queue,
    Exchange,
}

/// What the broker says about an existing queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueCounts {
    pub(crate) ready: u32,
    pub(crate) consumers: u32,
}

impl Session {
    /// Whether `name` exists (`Ok(None)`: it does not), and for a queue its counts.
    pub(crate) async fn probe(
        &self,
        name: &str,
        entity: Entity,
    ) -> Result<Option<QueueCounts>, lapin::Error> {
        let channel = match self.connection.create_channel().await {
            Ok(channel) => channel,
            Err(error) => {
                // No channel: the connection is in no state to carry on.
                self.mark_lost(error.to_string());
                return Err(error);
            }
        };
        let found = match entity {
            Entity::Queue => channel
                .queue_declare(
                    short(name),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|queue| QueueCounts {
                    ready: queue.message_count(),
                    consumers: queue.consumer_count(),
                }),
            Entity::Exchange => channel
                .exchange_declare(
                    short(name),
                    lapin::ExchangeKind::Headers,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|()| QueueCounts {
                    ready: 0,
                    consumers: 0,
                }),
        };
        let _ = channel.close(200, "probe done".into()).await;
        match found {
            Ok(counts) => Ok(Some(counts)),
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Checks (once per session) that a queue or exchange exists: [`CallError::NoRoute`] if not.
    pub(crate) async fn ensure_exists(&self, name: &str, entity: Entity) -> Result<(), CallError> {
        if self.lock_known().contains(name) {
            return Ok(());
        }
        match self.probe(name, entity).await {
            Ok(Some(_)) => {
                self.lock_known().insert(name.to_owned());
                Ok(())
            }
            Ok(None) => Err(CallError::NoRoute {
                queue: name.to_owned(),
            }),
            Err(error) => Err(CallError::ConnectionLost(error.to_string())),
        }
    }

    /// Whether a queue or exchange exists, asked once per session (both answers are kept).
    pub(crate) async fn exists(&self, name: &str, entity: Entity) -> Result<bool, CallError> {
        if self.lock_known().contains(name) {
            return Ok(true);
        }
        if self.lock_absent().contains(name) {
            return Ok(false);
        }
        match self.probe(name, entity).await {
            Ok(found) => {
                match found {
                    Some(_) => self.lock_known().insert(name.to_owned()),
                    None => self.lock_absent().insert(name.to_owned()),
                };
                Ok(found.is_some())
            }
            Err(error) => Err(CallError::ConnectionLost(error.to_string())),
        }
    }

    fn lock_absent(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.absent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A broker error that means "no such queue or exchange" (404 NOT_FOUND).
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}
