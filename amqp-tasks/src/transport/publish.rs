//! Publishing: a task message to its queue with `mandatory` (straight, or through the delay
//! exchange when its `eta` is ahead), the publisher confirm turned into a result (`NoRoute` for a
//! returned message), batches that hand every message over before the first confirm is awaited,
//! and requests that wait for their reply. Everything is bounded by the caller's deadline.

use super::Broker;
use super::probe::Entity;
use super::session::Session;
use crate::error::CallError;
use crate::protocol::reply::Reply;
use crate::protocol::retry::RetryPolicy;
use crate::protocol::{short, topology, unix_ms};
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use std::future::Future;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A task message ready to publish.
pub(crate) struct Message {
    /// The task queue (namespaced).
    pub(crate) queue: String,
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    /// Not before, Unix milliseconds: routed through the delay queues when ahead.
    pub(crate) eta_ms: Option<u64>,
}

impl Broker {
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
                .publish_until_taken(&exchange, queue, body, properties, deadline)
                .await
        })
        .await
        .unwrap_or(Err(CallError::Timeout))
    }

    /// Publishes many tasks at once: every publish is handed over before the first confirm is
    /// awaited. One result per message, in order.
    pub(crate) async fn publish_batch(
        &self,
        messages: Vec<Message>,
        deadline: Instant,
    ) -> Vec<Result<(), CallError>> {
        let connected = tokio::time::timeout_at(deadline, self.session_before(deadline)).await;
        let session = match connected.unwrap_or(Err(CallError::Timeout)) {
            Ok(session) => session,
            Err(error) => return messages.iter().map(|_| Err(error.clone())).collect(),
        };
        let channel = session.publisher();
        let mut started = Vec::with_capacity(messages.len());
        for message in messages {
            let routed = self
                .route(&session, &message.queue, message.properties, message.eta_ms)
                .await;
            let confirm = match routed {
                Ok((exchange, properties)) => session
                    .start_publish(
                        &channel,
                        &exchange,
                        &message.queue,
                        &message.body,
                        properties,
                    )
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
        if results
            .iter()
            .any(|result| matches!(result, Err(CallError::Rejected(reason)) if reason == NACKED))
        {
            // Reported as they are (a batch is not sent again), but the next publishes go to a
            // fresh channel: the nacking one may be stuck.
            session.renew_publisher(&channel).await;
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
                .with_reply_to(short(&session.reply_queue))
                .with_correlation_id(short(&pending.correlation_id));
            let (exchange, properties) = self.route(&session, queue, properties, eta_ms).await?;
            let mut pending = pending;
            // The reply is not made to wait for the confirm: whichever settles the call first
            // (the reply, a return or refusal through the confirm, or the deadline) decides.
            let answer = match session
                .publish_racing(
                    &exchange,
                    queue,
                    body,
                    properties,
                    deadline,
                    &mut pending.receiver,
                )
                .await?
            {
                Raced::Answered(answer) => answer,
                Raced::Taken => (&mut pending.receiver).await,
            };
            answer.map_err(|_| CallError::ConnectionLost(session.lost_reason()))
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
        // A delayed message is routed by the broker later, when nobody is told about a missing
        // queue: check now that the task queue and the delay queues exist. The quorum delay set
        // is used where its workers declared it.
        session.ensure_exists(queue, Entity::Queue).await?;
        let namespace = self.config.namespace.as_deref();
        let quorum = topology::delay_exchange_of(namespace, topology::QueueType::Quorum);
        let exchange = if session.exists(&quorum, Entity::Exchange).await? {
            quorum
        } else {
            let classic = topology::delay_exchange(namespace);
            session.ensure_exists(&classic, Entity::Exchange).await?;
            classic
        };
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            topology::DELAY_BUCKET_HEADER.into(),
            AMQPValue::LongString(bucket.to_string().into()),
        );
        Ok((exchange, properties.with_headers(headers)))
    }
}

/// How a publish raced against an answer ended.
pub(crate) enum Raced<T> {
    /// The broker took the message (confirmed, routed) before the answer came.
    Taken,
    /// The answer came first; the confirm no longer matters.
    Answered(T),
}

/// What a nack says: the broker did not take the message (a quorum queue electing its leader,
/// say). It is sent again, for a while: [`NACK_PATIENCE`].
const NACKED: &str = "the broker nacked the message";
/// How long nacked publishes are sent again (within the caller's deadline): long enough for a
/// quorum queue's leader election, short enough that a queue that refuses for good (full, with
/// `reject-publish`) is reported soon.
const NACK_PATIENCE: Duration = Duration::from_secs(5);

impl Session {
    /// Publishes with `mandatory`, awaits the confirm, and publishes again a message the broker
    /// nacked (a momentary refusal), with a backoff, for at most [`NACK_PATIENCE`] and never past
    /// `deadline`.
    pub(crate) async fn publish_until_taken(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let mut never = std::future::pending::<()>();
        self.publish_racing(
            exchange,
            routing_key,
            body,
            properties,
            deadline,
            &mut never,
        )
        .await
        .map(|_| ())
    }

    /// [`publish_until_taken`](Session::publish_until_taken), raced against `answer` (a
    /// request's reply): the publish ends as soon as its confirm is in (taken, returned or
    /// refused) or the answer came, whichever is first; the answer ends a nack's backoff too.
    pub(crate) async fn publish_racing<F: Future + Unpin>(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        deadline: Instant,
        answer: &mut F,
    ) -> Result<Raced<F::Output>, CallError> {
        let give_up = deadline.min(Instant::now() + NACK_PATIENCE);
        let mut attempt = 0;
        loop {
            let channel = self.publisher();
            let result = match self
                .start_publish(&channel, exchange, routing_key, body, properties.clone())
                .await
            {
                Ok(mut confirm) => {
                    tokio::select! {
                        // The confirm first when both are in: nothing is left pending then.
                        biased;
                        confirmation = &mut confirm => {
                            self.judge(confirmation, exchange, routing_key)
                        }
                        answer = &mut *answer => {
                            // lapin keeps an unresolved confirm that is dropped until its
                            // channel ends: it is awaited aside instead.
                            tokio::spawn(async move {
                                let _ = confirm.await;
                            });
                            return Ok(Raced::Answered(answer));
                        }
                    }
                }
                Err(error) => Err(error),
            };
            match result {
                Err(CallError::Rejected(reason)) if reason == NACKED => {
                    // The next attempt goes to a fresh channel: the nacking one may be stuck.
                    self.renew_publisher(&channel).await;
                    attempt += 1;
                    let wait = RetryPolicy::RECONNECT.delay(attempt);
                    if Instant::now() + wait >= give_up {
                        return Err(CallError::Rejected(reason));
                    }
                    tracing::debug!(exchange, routing_key, retry_in = ?wait, "the broker nacked a message; sending it again");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        answer = &mut *answer => return Ok(Raced::Answered(answer)),
                    }
                }
                Ok(()) => return Ok(Raced::Taken),
                Err(error) => return Err(error),
            }
        }
    }

    /// Hands a `mandatory` publish to lapin on `channel` (one of this session's publisher
    /// channels); its confirm is awaited separately, so that many publishes can be in flight at
    /// once.
    async fn start_publish(
        &self,
        channel: &lapin::Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, CallError> {
        channel
            .basic_publish(
                short(exchange),
                short(routing_key),
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

    pub(crate) async fn confirmed(
        &self,
        confirm: PublisherConfirm,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), CallError> {
        self.judge(confirm.await, exchange, routing_key)
    }

    /// What a publisher confirm says about the message: taken, returned (`NoRoute`) or refused.
    fn judge(
        &self,
        confirmation: lapin::Result<Confirmation>,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), CallError> {
        match confirmation.map_err(|e| self.failed(e))? {
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
            Confirmation::Nack(None) => Err(CallError::Rejected(NACKED.to_owned())),
        }
    }

    pub(crate) fn failed(&self, error: lapin::Error) -> CallError {
        // Any failure of the publisher channel retires the session: the next operation gets a
        // fresh connection instead of a channel in an unknown state.
        self.mark_lost(error.to_string());
        CallError::ConnectionLost(error.to_string())
    }
}
