//! The transport layer: one broker session at a time and everything done through it. It owns
//! connecting (and, when a session is lost, connecting again under the one
//! [`RetryPolicy`](crate::protocol::retry::RetryPolicy)), the publisher channel and its
//! confirms, reply routing, probes and declaring the topology.
//!
//! It must not know what a task is beyond the message it is handed: no stubs, no handlers, no
//! worker state. The client and the worker sit on top of it.

pub(crate) mod probe;
pub(crate) mod publish;
pub(crate) mod replies;
pub(crate) mod session;
pub(crate) mod tls;
pub(crate) mod topology;
pub(crate) mod url;

use crate::error::CallError;
use crate::protocol::retry::RetryPolicy;
use futures_core::Stream;
use session::Session;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use url::Endpoint;

/// How to reach the broker.
#[derive(Clone, Debug)]
pub(crate) struct BrokerConfig {
    pub(crate) url: String,
    /// Prefixes reply queues (and the delay exchange) like every other queue name.
    pub(crate) namespace: Option<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) connection_name: String,
    /// The longest heartbeat interval its connections ask for, in seconds (`None`: what the
    /// URL says, else the broker's); the scheduler's connections use a short one.
    pub(crate) max_heartbeat: Option<u16>,
}

/// The broker as the rest of the crate sees it: the live session, or a new one when it is lost,
/// on one of its nodes (tried in a shuffled order, so that many clients spread over a cluster;
/// after a loss, the next node first).
pub(crate) struct Broker {
    pub(crate) config: BrokerConfig,
    endpoints: Vec<Endpoint>,
    /// The node to try first at the next connect.
    next: AtomicUsize,
    current: Mutex<Option<Arc<Session>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Broker {
    /// Parses the URL (or list of URLs) of `config`.
    pub(crate) fn new(config: BrokerConfig) -> Result<Broker, String> {
        let mut endpoints = url::parse_list(&config.url)?;
        if let Some(max) = config.max_heartbeat {
            for endpoint in &mut endpoints {
                endpoint.cap_heartbeat(max);
            }
        }
        let start = crate::protocol::trace::random_u64() as usize % endpoints.len();
        Ok(Broker {
            config,
            endpoints,
            next: AtomicUsize::new(start),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The URL (or URLs) without passwords, for logs.
    pub(crate) fn url_redacted(&self) -> String {
        self.endpoints
            .iter()
            .map(|endpoint| endpoint.shown.as_str())
            .collect::<Vec<_>>()
            .join(",")
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

    /// The current session, alive or not.
    pub(crate) fn current(&self) -> Option<Arc<Session>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn live_session(&self) -> Option<Arc<Session>> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|s| s.is_alive()).cloned()
    }

    /// Connects (one connect at a time: concurrent callers share its result), to the first node
    /// of the list, from where the last one left off, that answers.
    pub(crate) async fn connect_session(&self) -> Result<Arc<Session>, lapin::Error> {
        let _single_flight = self.connecting.lock().await;
        if let Some(session) = self.live_session() {
            return Ok(session);
        }
        let config = &self.config;
        let count = self.endpoints.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..count {
            let index = (start + offset) % count;
            let endpoint = &self.endpoints[index];
            let opened =
                tokio::time::timeout(config.connect_timeout, Session::open(config, endpoint))
                    .await
                    .map_err(|_| {
                        lapin::Error::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to {} timed out", endpoint.shown),
                        ))
                    })
                    .and_then(|opened| opened);
            match opened {
                Ok(session) => {
                    // After a loss, the next node is tried first: this one may be the one gone.
                    self.next.store((index + 1) % count, Ordering::Relaxed);
                    tracing::debug!(url = %endpoint.shown, reply_queue = %session.reply_queue, "connected");
                    *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.clone());
                    return Ok(session);
                }
                Err(error) => {
                    if count > 1 {
                        tracing::debug!(url = %endpoint.shown, %error, "node unreachable; trying the next");
                    }
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            lapin::Error::from(std::io::Error::other("no broker URL to connect to"))
        }))
    }

    /// A live session, waiting for the broker (reconnecting under [`RetryPolicy::RECONNECT`])
    /// until `deadline`.
    pub(crate) async fn session_before(
        &self,
        deadline: Instant,
    ) -> Result<Arc<Session>, CallError> {
        let mut attempt = 0;
        loop {
            match self.session().await {
                Ok(session) => return Ok(session),
                Err(error) => {
                    attempt += 1;
                    let wait = RetryPolicy::RECONNECT.delay(attempt);
                    if Instant::now() + wait >= deadline {
                        return Err(error);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The live session, or (boxed: the cold path keeps the hot future small) a new one.
    pub(crate) async fn connected(&self, deadline: Instant) -> Result<Arc<Session>, CallError> {
        match self.live_session() {
            Some(session) => Ok(session),
            None => Box::pin(self.session_before(deadline)).await,
        }
    }

    /// Ends the session; calls in flight fail with [`CallError::ConnectionLost`].
    pub(crate) async fn close(&self) {
        let session = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(session) = session {
            session.close().await;
        }
    }
}

impl Drop for Broker {
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

/// The next item of a stream (lapin's consumers and event listeners).
pub(crate) async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// Consumes `queue` without acks (`no_ack`): for the queues whose messages are worth nothing once
/// read (inspect answers, control requests, events), never for tasks.
pub(crate) async fn consume_no_ack(
    channel: &lapin::Channel,
    queue: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..lapin::options::BasicConsumeOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
}
