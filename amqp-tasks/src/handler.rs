//! Running a task: decode its arguments, run the handler under its time limit with panics caught,
//! and encode what came out. Generic over the task, erased behind a function pointer for the
//! registry.

use crate::codec::Codec;
use crate::context::Context;
use crate::signature::normalize;
use crate::task::Task;
use crate::wire::{ErrorKind, ErrorReply};
use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

/// The server side of a task with a body: `#[task]` implements it; you do not.
pub trait Handler: Task {
    /// Runs the task function with decoded arguments.
    fn run(
        ctx: Context,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send + 'static;

    /// A human message for the task's error: its `Display`, else its `Debug`, else its type name.
    fn error_message(error: &Self::Error) -> String;

    /// Whether this error is worth another attempt: what [`Retryable`] says where the error type
    /// implements it, yes otherwise.
    fn should_retry(error: &Self::Error) -> bool;
}

/// Implemented by a task's error type to say which errors are worth retrying (a task with
/// `retries = N` retries every error otherwise).
///
/// ```
/// enum FetchError { NotFound, Unavailable }
///
/// impl amqp_tasks::Retryable for FetchError {
///     fn is_retryable(&self) -> bool {
///         matches!(self, FetchError::Unavailable)
///     }
/// }
/// ```
pub trait Retryable {
    /// True if another attempt might succeed.
    fn is_retryable(&self) -> bool;
}

/// Whether to retry, chosen by autoref specialization at the macro's expansion site.
pub mod retry {
    use super::Retryable;

    /// Wraps the error for method resolution.
    pub struct Verdict<'a, T>(pub &'a T);

    /// Chosen when the error implements [`Retryable`].
    pub trait AskTheError {
        /// The verdict.
        fn should_retry(&self) -> bool;
    }
    impl<T: Retryable> AskTheError for &Verdict<'_, T> {
        fn should_retry(&self) -> bool {
            self.0.is_retryable()
        }
    }

    /// Otherwise every error is retried.
    pub trait RetryAll {
        /// The verdict.
        fn should_retry(&self) -> bool;
    }
    impl<T> RetryAll for Verdict<'_, T> {
        fn should_retry(&self) -> bool {
            true
        }
    }
}

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
    let args = match codec.decode_args::<T>(body) {
        Ok(args) => args,
        Err(error) => {
            let failure = Outcome::failure(ErrorKind::BadPayload, error.to_string());
            return Box::pin(std::future::ready(failure));
        }
    };
    Box::pin(async move {
        match tokio::time::timeout(T::TIMEOUT, CatchUnwind(T::run(ctx, args))).await {
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

/// `catch_unwind` for a future: a panic in the handler becomes an error reply, not a dead worker.
struct CatchUnwind<F>(F);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of the only field; it is never moved out.
        let inner = unsafe { self.map_unchecked_mut(|this| &mut this.0) };
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

pub(crate) fn human(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// The task error's message, chosen by autoref specialization at the macro's expansion site,
/// where the error type is concrete.
pub mod message {
    use std::fmt::{Debug, Display};

    /// Wraps the error for method resolution.
    pub struct Message<'a, T>(pub &'a T);

    /// Chosen when the error implements `Display`.
    pub trait ViaDisplay {
        /// The message.
        fn text(&self) -> String;
    }
    impl<T: Display> ViaDisplay for &&Message<'_, T> {
        fn text(&self) -> String {
            self.0.to_string()
        }
    }

    /// Chosen when it implements `Debug` only.
    pub trait ViaDebug {
        /// The message.
        fn text(&self) -> String;
    }
    impl<T: Debug> ViaDebug for &Message<'_, T> {
        fn text(&self) -> String {
            format!("{:?}", self.0)
        }
    }

    /// The last resort: the type's name.
    pub trait ViaTypeName {
        /// The message.
        fn text(&self) -> String;
    }
    impl<T> ViaTypeName for Message<'_, T> {
        fn text(&self) -> String {
            super::normalize(std::any::type_name::<T>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::message::*;
    use super::*;

    #[derive(Debug)]
    struct DebugOnly;
    struct Opaque;

    #[test]
    #[allow(clippy::needless_borrow)] // the extra borrows select the implementation
    fn messages_prefer_display_then_debug_then_type_name() {
        assert_eq!((&&&Message(&"shown".to_owned())).text(), "shown");
        assert_eq!((&&&Message(&DebugOnly)).text(), "DebugOnly");
        assert_eq!((&&&Message(&Opaque)).text(), "Opaque");
    }

    #[tokio::test]
    async fn panics_are_caught() {
        let result = CatchUnwind(async { panic!("boom {}", 1) }).await;
        assert_eq!(panic_message(&*result.unwrap_err()), "boom 1");
        let fine = CatchUnwind(async { 5 }).await;
        assert_eq!(fine.unwrap(), 5);
    }
}
