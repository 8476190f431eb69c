//! The client layer: what a caller does. [`Client`] is a handle on the broker (configuration and
//! the transport's session); [`TaskCall`] and [`DynamicCall`] build calls that it sends fire and
//! forget (`.delay()`) or awaiting their reply (`.call()`), within deadlines it computes; a
//! [`Caller`] is a client or the context of a running task, whose deadline, trace and concurrency
//! slot its calls inherit.
//!
//! It must not know how tasks are served: no handlers, no registry, no consumers. The worker
//! builds on it (a relay's calls are client calls).

pub(crate) mod call;
pub(crate) mod caller;
pub(crate) mod dynamic;
pub(crate) mod inspect;
pub(crate) mod local;
mod stored;

pub use call::TaskCall;
pub use caller::Caller;
pub use dynamic::{DynamicCall, TaskFailure};
pub use inspect::QueueStatus;

use crate::error::{BrokerError, CallError, Error};
use crate::protocol::topology;
use crate::results::Results;
use crate::transport::publish::Message;
use crate::transport::session::Session;
use crate::transport::url::redact;
use crate::transport::{Broker, BrokerConfig};
use lapin::BasicProperties;
use local::{LocalBroker, LocalMessage};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The URL used when none is given: the local broker with RabbitMQ's default user.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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
    backend: Backend,
    confirm_timeout: Duration,
    /// Where task states and results are kept (`ClientBuilder::results`).
    results: Option<Results>,
}

/// Where a client's messages go.
enum Backend {
    /// A RabbitMQ broker (or the nodes of a cluster).
    Broker(Broker),
    /// An in-process worker, for tests ([`testing::TestWorker`](crate::testing::TestWorker)).
    Local(Arc<dyn LocalBroker>),
}

/// Builds a [`Client`] with options: `Client::builder(url).namespace("staging").connect().await`.
#[must_use]
pub struct ClientBuilder {
    broker: BrokerConfig,
    confirm_timeout: Duration,
    results: Option<String>,
    result_ttl: Duration,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &redact(&self.broker.url))
            .field("namespace", &self.broker.namespace)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.broker.connect_timeout)
            .field("connection_name", &self.broker.connection_name)
            .field("results", &self.results.is_some())
            .finish()
    }
}

impl ClientBuilder {
    /// Prefixes every queue name with `<namespace>.`, on both sides, to keep environments (or
    /// test runs) apart on one broker.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        self.broker.namespace = (!namespace.is_empty()).then_some(namespace);
        self
    }

    /// How long `.delay()` waits for the broker's publisher confirm (default 30 s).
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long connecting may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.broker.connect_timeout = timeout;
        self
    }

    /// The connection name shown in RabbitMQ's management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.broker.connection_name = name.into();
        self
    }

    /// Keeps task states and results in the store at `url` (`redis://host:port/db` with the
    /// `results-redis` feature, `postgres://user@host/db` with `results-postgres`): a worker
    /// writes there, a client reads there ([`Client::status`], [`Client::result`],
    /// [`Client::wait`]). The records follow the namespace. A URL whose store was not compiled
    /// in is a connect error naming the feature.
    pub fn results(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.results = (!url.is_empty()).then_some(url);
        self
    }

    /// How long the records a worker writes through this client are kept (default
    /// [`DEFAULT_RESULT_TTL`](crate::DEFAULT_RESULT_TTL), 24 h).
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.result_ttl = ttl;
        self
    }

    /// Connects.
    pub async fn connect(self) -> Result<Client, Error> {
        if let Some(namespace) = &self.broker.namespace {
            topology::check_name(namespace)
                .map_err(|e| Error::Config(format!("namespace: {e}")))?;
        }
        let results = match &self.results {
            Some(url) => Some(
                Results::connect(url, self.broker.namespace.as_deref(), self.result_ttl).await?,
            ),
            None => None,
        };
        let broker = Broker::new(self.broker).map_err(Error::Config)?;
        broker
            .connect_session()
            .await
            .map_err(|source| Error::Connect {
                url: broker.url_redacted(),
                source: BrokerError::new(source),
            })?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                backend: Backend::Broker(broker),
                confirm_timeout: self.confirm_timeout,
                results,
            }),
        })
    }
}

impl Client {
    /// Connects to `url` (`amqp://user:password@host:port/vhost`, the vhost URL-encoded: `%2f`
    /// for `/`; `amqps://` for TLS, with RabbitMQ's `cacertfile`, `certfile`, `keyfile`,
    /// `verify` and `server_name_indication` parameters), or to one of a comma-separated list of
    /// such URLs: the nodes of a cluster, tried in a shuffled order, the next one after a loss.
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
            broker: BrokerConfig {
                url: url.into(),
                namespace: None,
                connect_timeout: Duration::from_secs(10),
                connection_name: format!(
                    "amqp-tasks {} pid {}",
                    std::env::args().next().unwrap_or_default(),
                    std::process::id()
                ),
                max_heartbeat: None,
            },
            confirm_timeout: Duration::from_secs(30),
            results: None,
            result_ttl: crate::results::DEFAULT_RESULT_TTL,
        }
    }

    /// A second client to the same broker(s) and namespace, not connected yet, whose
    /// connections ask for a heartbeat every `max_heartbeat` seconds at most (the scheduler's:
    /// a silent network loss must hand its token on within seconds). `None` for a client backed
    /// by an in-process test worker.
    pub(crate) fn sibling(&self, max_heartbeat: u16, name: &str) -> Option<Result<Client, Error>> {
        let broker = self.broker()?;
        let mut config = broker.config.clone();
        config.max_heartbeat = Some(max_heartbeat);
        config.connection_name = format!("{} ({name})", config.connection_name);
        Some(
            Broker::new(config)
                .map_err(Error::Config)
                .map(|broker| Client {
                    inner: Arc::new(ClientInner {
                        backend: Backend::Broker(broker),
                        confirm_timeout: self.inner.confirm_timeout,
                        // The scheduler only sends ticks: it keeps no states.
                        results: None,
                    }),
                }),
        )
    }

    /// A client whose messages go to `local` instead of a broker.
    pub(crate) fn local(local: Arc<dyn LocalBroker>) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                backend: Backend::Local(local),
                confirm_timeout: Duration::from_secs(30),
                results: None,
            }),
        }
    }

    fn broker(&self) -> Option<&Broker> {
        match &self.inner.backend {
            Backend::Broker(broker) => Some(broker),
            Backend::Local(_) => None,
        }
    }

    /// The namespace prefixed to queue names, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.broker()?.config.namespace.as_deref()
    }

    /// The broker-side name of a task queue: `queue`, or `<namespace>.queue`.
    pub fn queue_name(&self, queue: &str) -> String {
        topology::queue_name(self.namespace(), queue)
    }

    /// The URL (or the comma-separated list of URLs) without passwords, for logs.
    pub fn url_redacted(&self) -> String {
        match &self.inner.backend {
            Backend::Broker(broker) => broker.url_redacted(),
            Backend::Local(_) => "(an in-process test worker)".to_owned(),
        }
    }

    /// The node the current connection goes to (its URL, password redacted), if connected.
    pub fn connected_to(&self) -> Option<String> {
        self.broker()?
            .current()
            .filter(|session| session.is_alive())
            .map(|session| session.url.clone())
    }

    pub(crate) fn confirm_timeout(&self) -> Duration {
        self.inner.confirm_timeout
    }

    /// How many `.call()`s are waiting for their reply on the current connection (a call that
    /// gives up, or whose future is dropped, no longer counts).
    pub fn pending_calls(&self) -> usize {
        self.broker()
            .and_then(Broker::current)
            .map_or(0, |session| session.pending_calls())
    }

    /// Closes the connection; calls in flight fail with [`CallError::ConnectionLost`].
    pub async fn close(&self) {
        if let Some(broker) = self.broker() {
            broker.close().await;
        }
    }

    /// The live session, opening a new one if there is none or it was lost.
    pub(crate) async fn session(&self) -> Result<Arc<Session>, CallError> {
        match &self.inner.backend {
            Backend::Broker(broker) => broker.session().await,
            Backend::Local(_) => Err(CallError::ConnectionLost(
                "this client is backed by an in-process test worker, not a broker".to_owned(),
            )),
        }
    }

    /// Publishes a task message (see [`Broker::publish`]).
    pub(crate) async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        eta_ms: Option<u64>,
        deadline: Instant,
    ) -> Result<(), CallError> {
        match &self.inner.backend {
            Backend::Broker(broker) => {
                broker
                    .publish(queue, body, properties, eta_ms, deadline)
                    .await
            }
            Backend::Local(local) => {
                local
                    .publish(LocalMessage {
                        queue: queue.to_owned(),
                        body: body.to_vec(),
                        properties,
                        eta_ms,
                    })
                    .await
            }
        }
    }

    pub(crate) async fn publish_batch(
        &self,
        messages: Vec<Message>,
        deadline: Instant,
    ) -> Vec<Result<(), CallError>> {
        match &self.inner.backend {
            Backend::Broker(broker) => broker.publish_batch(messages, deadline).await,
            Backend::Local(local) => {
                let mut results = Vec::with_capacity(messages.len());
                for message in messages {
                    results.push(
                        local
                            .publish(LocalMessage {
                                queue: message.queue,
                                body: message.body,
                                properties: message.properties,
                                eta_ms: message.eta_ms,
                            })
                            .await,
                    );
                }
                results
            }
        }
    }

    pub(crate) async fn request(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        eta_ms: Option<u64>,
        deadline: Instant,
    ) -> Result<crate::protocol::reply::Reply, CallError> {
        match &self.inner.backend {
            Backend::Broker(broker) => {
                broker
                    .request(queue, body, properties, eta_ms, deadline)
                    .await
            }
            Backend::Local(local) => {
                let message = LocalMessage {
                    queue: queue.to_owned(),
                    body: body.to_vec(),
                    properties,
                    eta_ms,
                };
                tokio::time::timeout_at(deadline, local.request(message, deadline))
                    .await
                    .unwrap_or(Err(CallError::Timeout))
            }
        }
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
