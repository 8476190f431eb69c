//! Outcomes: the one vocabulary for how a task message ended in a worker, shared by the metrics'
//! `outcome` label, the events and the logs. Pure: the worker computes it once, where it settles
//! a run.
//!
//! | what happened | outcome | caller gets |
//! |---|---|---|
//! | returned `Ok` | `succeeded` | the value |
//! | returned `Err` (or panicked, with `retry_on_panic`), a retry is scheduled | `retried` | (waits) |
//! | returned `Err`, no retry left | `failed` | `CallError::Task(E)` |
//! | panicked / ran past its time limit, no retry left | `panicked` / `time_limit` | `Panicked` / `TimeLimit` |
//! | refused before running (bad payload, unknown task, signature, too large, expired, too many redeliveries) | `rejected` | the matching `CallError` |
//! | revoked (before it ran, or terminated while running) | `revoked` | `CallError::Revoked` |
//!
//! Dead letters are counted apart: a `failed`, `panicked`, `time_limit` or `rejected` message may
//! also be dead-lettered.

use super::reply::ErrorKind;

/// How one task message ended in a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Outcome {
    /// The handler returned `Ok`.
    Succeeded,
    /// The attempt failed and another one is scheduled.
    Retried,
    /// The handler returned `Err` (or its result could not be encoded), no retry left.
    Failed,
    /// The handler panicked, no retry left.
    Panicked,
    /// The handler ran past its time limit.
    TimeLimit,
    /// Refused before running.
    Rejected,
    /// Revoked before it ran, or terminated while running.
    Revoked,
}

impl Outcome {
    /// Every outcome, in the order of the table above.
    #[cfg(test)]
    pub(crate) const ALL: [Outcome; 7] = [
        Outcome::Succeeded,
        Outcome::Retried,
        Outcome::Failed,
        Outcome::Panicked,
        Outcome::TimeLimit,
        Outcome::Rejected,
        Outcome::Revoked,
    ];

    /// Its name in metrics, events and logs.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::Panicked => "panicked",
            Outcome::TimeLimit => "time_limit",
            Outcome::Rejected => "rejected",
            Outcome::Revoked => "revoked",
        }
    }

    /// The outcome of a message answered with a framework failure of `kind` (no retry left):
    /// the handler's own failures keep their name, the rest was refused before it could run.
    pub(crate) const fn of_failure(kind: ErrorKind) -> Outcome {
        match kind {
            ErrorKind::Task | ErrorKind::BadResult => Outcome::Failed,
            ErrorKind::Panicked => Outcome::Panicked,
            ErrorKind::TimeLimit => Outcome::TimeLimit,
            ErrorKind::Revoked => Outcome::Revoked,
            ErrorKind::UnknownTask
            | ErrorKind::BadPayload
            | ErrorKind::SignatureMismatch
            | ErrorKind::Deadline
            | ErrorKind::UnsupportedContentType
            | ErrorKind::TooLarge
            | ErrorKind::TooManyRedeliveries => Outcome::Rejected,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_vocabulary() {
        let names: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names,
            [
                "succeeded",
                "retried",
                "failed",
                "panicked",
                "time_limit",
                "rejected",
                "revoked"
            ]
        );
    }

    #[test]
    fn failures_map_to_what_the_caller_is_told() {
        assert_eq!(Outcome::of_failure(ErrorKind::Task), Outcome::Failed);
        assert_eq!(Outcome::of_failure(ErrorKind::Panicked), Outcome::Panicked);
        assert_eq!(
            Outcome::of_failure(ErrorKind::TimeLimit),
            Outcome::TimeLimit
        );
        assert_eq!(Outcome::of_failure(ErrorKind::Revoked), Outcome::Revoked);
        for refused in [
            ErrorKind::UnknownTask,
            ErrorKind::BadPayload,
            ErrorKind::SignatureMismatch,
            ErrorKind::Deadline,
            ErrorKind::UnsupportedContentType,
            ErrorKind::TooLarge,
            ErrorKind::TooManyRedeliveries,
        ] {
            assert_eq!(
                Outcome::of_failure(refused),
                Outcome::Rejected,
                "{refused:?}"
            );
        }
    }
}
