//! Execute: the stage of a delivery that runs its handler. Decodes the arguments with the
//! request's codec, runs the task function under its time limit with panics caught, and encodes
//! what came out ([`Outcome`]). Generic over the task, erased behind a function pointer for the
//! registry. It does not reply, dead-letter or ack: that is the worker's next stage.

use crate::context::Context;
use crate::handler::Handler;
use crate::protocol::codec::Codec;
use crate::protocol::duration::human;
use crate::protocol::reply::{ErrorKind, ErrorReply};
use crate::protocol::signature::normalize;
use crate::task::decode_args;
use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::Poll;

/// What came out of a run, encoded in the request's codec.
pub(crate) enum Outcome {
    /// The value, for a `result` reply.
    Value(Vec<u8>),
    /// The task's own error, as an `error` reply body; `retryable` if another attempt may help.
    TaskError {
        body: Vec<u8>,
        message: String,
        retryable: bool,
    },
    /// A framework failure: answered, and dead-lettered (a panic is retried if the task asks).
    Failure {
        kind: ErrorKind,
        message: String,
        retryable: bool,
    },
}

impl Outcome {
    fn failure(kind: ErrorKind, message: String) -> Outcome {
        Outcome::Failure {
            kind,
            message,
            retryable: false,
        }
    }
}

/// Decodes the arguments from the borrowed body (no copy of it), then returns the run.
pub(crate) fn run<T: Handler>(
    ctx: Context,
    codec: Codec,
    body: &[u8],
) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    let args = match decode_args::<T>(codec, body) {
        Ok(args) => args,
        Err(error) => {
            let failure = Outcome::failure(ErrorKind::BadPayload, error.to_string());
            return Box::pin(std::future::ready(failure));
        }
    };
    Box::pin(async move {
        match tokio::time::timeout(T::TIMEOUT, CatchUnwind::new(T::run(ctx, args))).await {
            Err(_) => Outcome::failure(
                ErrorKind::TimeLimit,
                format!("cancelled after its time limit of {}", human(T::TIMEOUT)),
            ),
            Ok(Err(panic)) => Outcome::Failure {
                kind: ErrorKind::Panicked,
                message: panic_message(&*panic),
                retryable: T::RETRY_ON_PANIC,
            },
            Ok(Ok(Ok(value))) => match codec.encode(&value) {
                Ok(body) => Outcome::Value(body),
                Err(error) => Outcome::failure(
                    ErrorKind::BadResult,
                    format!("the result could not be encoded: {error}"),
                ),
            },
            Ok(Ok(Err(error))) => {
                let message = T::error_message(&error);
                let retryable = T::should_retry(&error);
                let type_name = normalize(std::any::type_name::<T::Error>());
                let reply =
                    ErrorReply::new(ErrorKind::Task, &type_name, message.clone(), Some(error));
                match codec.encode(&reply) {
                    Ok(body) => Outcome::TaskError {
                        body,
                        message,
                        retryable,
                    },
                    Err(error) => Outcome::failure(
                        ErrorKind::BadResult,
                        format!("the task's error could not be encoded: {error}"),
                    ),
                }
            }
        }
    })
}

pin_project_lite::pin_project! {
    /// `catch_unwind` for a future: a panic in the handler becomes an error reply, not a dead
    /// worker.
    struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    fn new(inner: F) -> Self {
        CatchUnwind { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn panics_are_caught() {
        let result = CatchUnwind::new(async { panic!("boom {}", 1) }).await;
        assert_eq!(panic_message(&*result.unwrap_err()), "boom 1");
        let fine = CatchUnwind::new(async { 5 }).await;
        assert_eq!(fine.unwrap(), 5);
    }
}
