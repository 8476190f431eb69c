//! Local delivery: where a [`Client`](super::Client) sends its messages when it is backed by an
//! in-process worker instead of a broker ([`testing::TestWorker`](crate::testing::TestWorker)).
//! The messages are exactly those a broker would carry (body, properties, headers); only the
//! transport is gone. The client layer defines what it needs here; the test worker, which sits
//! above the worker layer, implements it.

use crate::error::CallError;
use crate::protocol::reply::Reply;
use lapin::BasicProperties;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use tokio::time::Instant;

/// A message as it would be published: to `queue` (with the namespace), `eta_ms` its not-before
/// time when it is to be held.
pub(crate) struct LocalMessage {
    pub(crate) queue: String,
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    pub(crate) eta_ms: Option<u64>,
}

pub(crate) type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What takes a client's messages in place of a broker.
pub(crate) trait LocalBroker: Send + Sync + fmt::Debug {
    /// Takes a message (what a publisher confirm says on a broker): `NoRoute` when no queue
    /// would take it.
    fn publish(&self, message: LocalMessage) -> LocalFuture<'_, Result<(), CallError>>;

    /// Takes a request and resolves with its reply, or with `Timeout` at `deadline`.
    fn request(
        &self,
        message: LocalMessage,
        deadline: Instant,
    ) -> LocalFuture<'_, Result<Reply, CallError>>;
}
