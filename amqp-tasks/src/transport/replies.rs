//! Reply routing: the map from correlation id to the call waiting for it, and the task that
//! consumes the session's reply queue and hands each reply to its caller. A session that ends
//! fails every waiting call at once; a cancelled call leaves nothing behind.

use super::next;
use super::session::Session;
use crate::error::CallError;
use crate::protocol::reply::Reply;
use lapin::Consumer;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::{oneshot, watch};

#[derive(Default)]
pub(crate) struct Pending {
    pub(super) waiting: HashMap<u64, oneshot::Sender<Reply>, BuildHasherDefault<Sequential>>,
    pub(super) lost: bool,
}

/// The hasher of the correlation map. Its keys are this session's own counter (only lookups come
/// from the broker), so a multiplicative hash spreads them as well as SipHash does, for a
/// fraction of the work per call.
#[derive(Default)]
pub(crate) struct Sequential(u64);

impl Hasher for Sequential {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// `secret-<number in lowercase hex>`, what a request carries as its `correlation_id` (the same
/// text as `format!("{secret}-{number:x}")`, without the formatting machinery).
fn correlation_id(secret: &str, number: u64) -> String {
    let digits = (64 - number.leading_zeros()).div_ceil(4).max(1);
    let mut id = String::with_capacity(secret.len() + 1 + digits as usize);
    id.push_str(secret);
    id.push('-');
    for nibble in (0..digits).rev() {
        let digit = ((number >> (nibble * 4)) & 0xF) as u8;
        id.push(char::from(if digit < 10 {
            b'0' + digit
        } else {
            b'a' + digit - 10
        }));
    }
    id
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
            correlation_id: correlation_id(&self.correlation_secret, correlation),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_the_secret_and_the_number_in_hex() {
        for number in [
            0,
            1,
            9,
            10,
            15,
            16,
            255,
            256,
            0xABCDEF,
            u64::MAX / 3,
            u64::MAX,
        ] {
            assert_eq!(
                correlation_id("s3cr3t", number),
                format!("s3cr3t-{number:x}")
            );
        }
    }

    #[test]
    fn the_correlation_map_finds_what_it_holds() {
        let mut pending = Pending::default();
        let mut receivers = Vec::new();
        for number in (0..10_000u64).chain([u64::MAX]) {
            let (sender, receiver) = oneshot::channel();
            pending.waiting.insert(number, sender);
            receivers.push(receiver);
        }
        for number in (0..10_000u64).chain([u64::MAX]) {
            assert!(pending.waiting.remove(&number).is_some(), "{number}");
        }
        assert!(pending.waiting.is_empty());
    }
}
