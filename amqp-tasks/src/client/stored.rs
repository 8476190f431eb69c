//! Task states and results by id, read from the client's result store: [`Client::status`],
//! [`Client::result`], [`Client::wait`]. A stored result is the reply its worker would have sent,
//! decoded through the stub's types exactly as `.call()` decodes a reply; a record of another
//! task (or of other types) is a `SignatureMismatch`, never misread bytes.

use super::Client;
use crate::error::{CallError, Error};
use crate::protocol::reply::{Reply, decode_reply};
use crate::results::{Record, Results, TaskState, TaskStatus};
use crate::task::{Task, TaskId};
use std::time::Duration;
use tokio::time::Instant;

impl Client {
    /// The result store given with [`ClientBuilder::results`](super::ClientBuilder::results).
    pub(crate) fn results(&self) -> Option<&Results> {
        self.inner.results.as_ref()
    }

    fn store(&self) -> Result<&Results, Error> {
        self.results().ok_or_else(|| {
            Error::Config(
                "this client has no result store: connect it with ClientBuilder::results(url)"
                    .to_owned(),
            )
        })
    }

    /// Where the task `id` is, as its worker last wrote it; `None` for an id the store has never
    /// seen, or whose record expired. An error when the client has no store, or the store cannot
    /// be read.
    pub async fn status(&self, id: &TaskId) -> Result<Option<TaskStatus>, Error> {
        Ok(self
            .store()?
            .read(id.as_str())
            .await?
            .map(|record| record.status))
    }

    /// The result of task `id`, typed by its stub `T`: `None` while it has none (unknown, running,
    /// retrying, expired); `Some(Err(CallError::SignatureMismatch(..)))` when `id` is a task of
    /// another name or other types.
    pub async fn result<T: Task>(
        &self,
        id: &TaskId,
    ) -> Result<Option<Result<T::Output, CallError<T::Error>>>, Error> {
        Ok(self
            .store()?
            .read(id.as_str())
            .await?
            .and_then(|record| outcome::<T>(id, record)))
    }

    /// Waits until task `id` has a result, and returns it, typed by its stub `T`;
    /// [`CallError::Timeout`] when `timeout` passes first. It waits on the store's notifications
    /// (Redis pub/sub, PostgreSQL `LISTEN`), not by polling in a loop. A client without a store,
    /// or a store that cannot be reached, is [`CallError::ConnectionLost`].
    pub async fn wait<T: Task>(
        &self,
        id: &TaskId,
        timeout: Duration,
    ) -> Result<T::Output, CallError<T::Error>> {
        let store = self
            .store()
            .map_err(|e| CallError::ConnectionLost(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let record = store
            .wait(id.as_str(), deadline)
            .await
            .map_err(|e| CallError::ConnectionLost(e.to_string()))?;
        record
            .and_then(|record| outcome::<T>(id, record))
            .unwrap_or(Err(CallError::Timeout))
    }
}

/// A record's result, decoded through `T`'s types, if it has one.
fn outcome<T: Task>(id: &TaskId, record: Record) -> Option<Result<T::Output, CallError<T::Error>>> {
    if !record.task.is_empty() && record.task != T::NAME {
        return Some(Err(CallError::SignatureMismatch(format!(
            "task {id} is a `{}`, not a `{}`",
            record.task,
            T::NAME
        ))));
    }
    if let Some(signature) = &record.signature
        && !T::signature().accepts(signature)
    {
        return Some(Err(CallError::SignatureMismatch(format!(
            "task {id} was run with signature {signature}; this stub of `{}` is `{}` ({})",
            T::NAME,
            T::signature().text(),
            T::signature().fingerprint()
        ))));
    }
    if !record.status.state.is_final() {
        return None;
    }
    match record.reply {
        Some(reply) => Some(decode_reply::<T::Output, T::Error>(
            Reply {
                kind: Some(reply.kind),
                content_type: Some(reply.content_type),
                body: reply.body,
            },
            T::CODEC,
        )),
        None if record.status.state == TaskState::Revoked => Some(Err(CallError::Revoked)),
        None => Some(Err(CallError::BadReply(format!(
            "task {id} is {:?} but its record holds no reply",
            record.status.state
        )))),
    }
}
