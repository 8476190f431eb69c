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
use crate::state::MissingState;
use crate::task::{Task, decode_args};
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
///
/// Every piece of the user's code is run with its panics caught: the handler, but also the
/// arguments' `Deserialize`, the result's and the error's `Serialize`, the error's `Display`, its
/// `Retryable`, and the `Drop`s that run when a time limit cancels the handler. A panic is a
/// failure of the task (answered, dead-lettered), never of the worker.
pub(crate) fn run<T: Handler>(
    ctx: Context,
    codec: Codec,
    body: &[u8],
) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    run_with::<T, _, _>(ctx, codec, body, T::run)
}

/// [`run`] with the function that starts the task given: a linked handler's, or a test's mock.
pub(crate) fn run_with<T, F, Fut>(
    ctx: Context,
    codec: Codec,
    body: &[u8],
    start: F,
) -> Pin<Box<dyn Future<Output = Outcome> + Send>>
where
    T: Task,
    F: FnOnce(Context, T::Args) -> Result<Fut, MissingState>,
    Fut: Future<Output = Result<T::Output, T::Error>> + Send + 'static,
{
    let args = match catch_unwind(AssertUnwindSafe(|| decode_args::<T>(codec, body))) {
        Ok(Ok(args)) => args,
        Ok(Err(error)) => {
            let failure = Outcome::failure(ErrorKind::BadPayload, error.to_string());
            return Box::pin(std::future::ready(failure));
        }
        Err(panic) => {
            let failure = panicked("decoding the arguments", &*panic);
            return Box::pin(std::future::ready(failure));
        }
    };
    let started = match catch_unwind(AssertUnwindSafe(|| start(ctx, args))) {
        Ok(Ok(started)) => started,
        Ok(Err(missing)) => {
            let failure = Outcome::failure(ErrorKind::UnknownTask, missing.to_string());
            return Box::pin(std::future::ready(failure));
        }
        Err(panic) => {
            let failure = panicked("starting the task", &*panic);
            return Box::pin(std::future::ready(failure));
        }
    };
    Box::pin(async move {
        let mut handler = Box::pin(CatchUnwind::new(started));
        let finished = tokio::time::timeout(T::TIMEOUT, &mut handler).await;
        // Dropped here, within reach of `catch_unwind`: cancelling a handler runs its `Drop`s.
        let dropped = catch_unwind(AssertUnwindSafe(move || drop(handler)));
        match finished {
            Err(_) => {
                let mut message =
                    format!("cancelled after its time limit of {}", human(T::TIMEOUT));
                if let Err(panic) = dropped {
                    message.push_str(&format!(
                        "; dropping it panicked: {}",
                        panic_message(&*panic)
                    ));
                }
                Outcome::failure(ErrorKind::TimeLimit, message)
            }
            Ok(Err(panic)) => Outcome::Failure {
                kind: ErrorKind::Panicked,
                message: panic_message(&*panic),
                retryable: T::RETRY_ON_PANIC,
            },
            Ok(Ok(_)) if dropped.is_err() => {
                let panic = dropped.err().unwrap_or_else(|| Box::new(()));
                panicked("dropping the finished handler", &*panic)
            }
            Ok(Ok(Ok(value))) => match catch_unwind(AssertUnwindSafe(|| codec.encode(&value))) {
                Ok(Ok(body)) => Outcome::Value(body),
                Ok(Err(error)) => Outcome::failure(
                    ErrorKind::BadResult,
                    format!("the result could not be encoded: {error}"),
                ),
                Err(panic) => panicked("encoding the result", &*panic),
            },
            Ok(Ok(Err(error))) => task_error::<T>(codec, error),
        }
    })
}

/// The task's own error as an outcome: its message, whether to retry it, its reply body.
fn task_error<T: Task>(codec: Codec, error: T::Error) -> Outcome {
    let described = catch_unwind(AssertUnwindSafe(|| {
        (T::error_message(&error), T::should_retry(&error))
    }));
    let (message, retryable) = match described {
        Ok(described) => described,
        Err(panic) => return panicked("describing the task's error", &*panic),
    };
    let type_name = normalize(std::any::type_name::<T::Error>());
    let reply = ErrorReply::new(ErrorKind::Task, &type_name, message.clone(), Some(error));
    match catch_unwind(AssertUnwindSafe(|| codec.encode(&reply))) {
        Ok(Ok(body)) => Outcome::TaskError {
            body,
            message,
            retryable,
        },
        Ok(Err(error)) => Outcome::failure(
            ErrorKind::BadResult,
            format!("the task's error could not be encoded: {error}"),
        ),
        Err(panic) => panicked("encoding the task's error", &*panic),
    }
}

/// A panic of the user's code outside the handler itself: not worth a retry.
fn panicked(doing: &str, panic: &(dyn Any + Send)) -> Outcome {
    Outcome::failure(
        ErrorKind::Panicked,
        format!("{doing} panicked: {}", panic_message(panic)),
    )
}

pin_project_lite::pin_project! {
    /// `catch_unwind` for a future: a panic in the handler becomes an error reply, not a dead
    /// worker.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
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

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
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
