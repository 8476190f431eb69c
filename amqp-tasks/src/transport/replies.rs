//! Reply routing: the map from correlation id to the call waiting for it, and the task that
//! consumes the session's reply queue and hands each reply to its caller. A session that ends
//! fails every waiting call at once; a cancelled call leaves nothing behind.

use super::next;
use super::session::Session;
use crate::error::CallError;
use crate::protocol::reply::Reply;
use lapin::Consumer;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::{oneshot, watch};

#[derive(Default)]
pub(crate) struct Pending {
    pub(super) waiting: HashMap<u64, oneshot::Sender<Reply>>,
    pub(super) lost: bool,
}

/// A call waiting for its reply; dropping it (a cancelled call) forgets the correlation id.
pub(crate) struct PendingReply {
    correlation: u64,
    /// What the request carries as its `correlation_id`: the session's secret and the number.
    pub(crate) correlation_id: String,
    pub(crate) receiver: oneshot::Receiver<Reply>,
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
    pub(crate) fn register(self: &Arc<Self>) -> Result<PendingReply, CallError> {
        let correlation = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        let mut pending = self.lock_pending();
        if pending.lost {
            return Err(CallError::ConnectionLost(self.lost_reason()));
        }
        pending.waiting.insert(correlation, sender);
        Ok(PendingReply {
            correlation,
            correlation_id: format!("{}-{correlation:x}", self.correlation_secret),
            receiver,
            session: self.clone(),
        })
    }

    fn deliver(&self, delivery: lapin::message::Delivery) {
        let correlation = delivery
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|id| id.as_str().strip_prefix(self.correlation_secret.as_str()))
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|number| u64::from_str_radix(number, 16).ok());
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
}

pub(super) async fn route_replies(
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

impl Session {
    /// Calls waiting for a reply on this session (for tests of bounded memory).
    pub(crate) fn pending_calls(&self) -> usize {
        self.lock_pending().waiting.len()
    }
}
