//! [`Handler`]: the server side of a task with a body, which `#[task]` implements (the states it
//! needs, and running the function with them), the support of the error descriptions `#[task]`
//! generates for every task, and [`Retryable`], by which an error type says what is worth another
//! attempt. Running a handler is the worker's.

use crate::context::Context;
use crate::protocol::schedule::Schedule;
use crate::state::{MissingState, StateNeed};
use crate::task::Task;
use std::future::Future;

/// The server side of a task with a body: `#[task]` implements it; you do not.
pub trait Handler: Task {
    /// The `State<T>` parameters it takes, which a worker must be given.
    const STATES: &'static [StateNeed];
    /// When it ticks, for a periodic task (`every` / `cron`).
    const SCHEDULE: Option<Schedule> = None;

    /// Takes the task's states from the context, then runs the task function with the decoded
    /// arguments; a missing state is an error before anything runs.
    fn run(
        ctx: Context,
        args: Self::Args,
    ) -> Result<
        impl Future<Output = Result<Self::Output, Self::Error>> + Send + 'static,
        MissingState,
    >;
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
    #[derive(Debug)]
    pub struct Check<'a, T>(pub &'a T);

    /// Chosen when the error implements [`Retryable`].
    pub trait AskTheError {
        /// The verdict.
        fn should_retry(&self) -> bool;
    }
    impl<T: Retryable> AskTheError for &Check<'_, T> {
        fn should_retry(&self) -> bool {
            self.0.is_retryable()
        }
    }

    /// Otherwise every error is retried.
    pub trait RetryAll {
        /// The verdict.
        fn should_retry(&self) -> bool;
    }
    impl<T> RetryAll for Check<'_, T> {
        fn should_retry(&self) -> bool {
            true
        }
    }
}

/// The task error's message, chosen by autoref specialization at the macro's expansion site,
/// where the error type is concrete.
pub mod message {
    use std::fmt::{Debug, Display};

    /// Wraps the error for method resolution.
    #[derive(Debug)]
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
            crate::protocol::signature::normalize(std::any::type_name::<T>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::message::*;

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
}
