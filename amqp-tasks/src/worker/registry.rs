//! The registry of tasks linked into this binary, filled at link time by `#[task]` through
//! `inventory`, and the choice of which of them a worker serves.
//!
//! A crate's tasks are registered only if the crate is linked: a binary that serves the tasks of
//! another crate it does not otherwise use must say `use that_crate as _;`.

use super::execute::{self, Outcome};
use crate::context::Context;
use crate::error::Error;
use crate::handler::Handler;
use crate::protocol::codec::Codec;
use crate::protocol::schedule::Schedule;
use crate::protocol::signature::Signature;
pub use crate::state::StateNeed;
use crate::task::{Param, Task};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub(crate) type Run = fn(Context, Codec, &[u8]) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A task served by this binary, as registered by `#[task]`.
#[derive(Debug, Clone)]
pub struct Registration {
    name: &'static str,
    queue: &'static str,
    params: &'static [Param],
    output: &'static str,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    store_result: bool,
    signature: fn() -> &'static Signature,
    states: &'static [StateNeed],
    schedule: Option<Schedule>,
    pub(crate) run: Run,
    module_path: &'static str,
    file: &'static str,
    line: u32,
}

inventory::collect!(Registration);

impl Registration {
    #[doc(hidden)]
    pub const fn of<T: Handler>(
        module_path: &'static str,
        file: &'static str,
        line: u32,
    ) -> Registration {
        let mut registration =
            Registration::served_by::<T>(execute::run::<T>, T::STATES, (module_path, file, line));
        registration.schedule = T::SCHEDULE;
        registration
    }

    /// A task that `run` serves in place of a linked handler (a test's mock).
    pub(crate) fn substitute<T: Task>(run: Run) -> Registration {
        Registration::served_by::<T>(run, &[], ("a mock", "", 0))
    }

    const fn served_by<T: Task>(
        run: Run,
        states: &'static [StateNeed],
        (module_path, file, line): (&'static str, &'static str, u32),
    ) -> Registration {
        Registration {
            name: T::NAME,
            queue: T::QUEUE,
            params: T::PARAMS,
            output: T::OUTPUT,
            timeout: T::TIMEOUT,
            retries: T::RETRIES,
            backoff: T::BACKOFF,
            store_result: T::STORE_RESULT,
            signature: T::signature,
            states,
            schedule: None,
            run,
            module_path,
            file,
            line,
        }
    }

    /// Why a call from a stub with this signature fingerprint is refused, if it is (a stub of
    /// other types).
    pub(crate) fn refuses_signature(&self, fingerprint: &str) -> Option<String> {
        let ours = self.signature();
        (!ours.accepts(fingerprint)).then(|| {
            format!(
                "the caller's stub of `{}` has signature {fingerprint}, this worker serves `{}` ({})",
                self.name,
                ours.text(),
                ours.fingerprint()
            )
        })
    }

    /// Whether a result store keeps its states and results (`store_result`).
    pub fn store_result(&self) -> bool {
        self.store_result
    }

    /// The signature fingerprint its stubs send.
    pub(crate) fn fingerprint(&self) -> &'static str {
        (self.signature)().fingerprint()
    }

    /// The task name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its queue, before any namespace prefix.
    pub fn queue(&self) -> &'static str {
        self.queue
    }

    /// Its parameters (the `Context` excluded).
    pub fn params(&self) -> &'static [Param] {
        self.params
    }

    /// The return type as written.
    pub fn output(&self) -> &'static str {
        self.output
    }

    /// Its time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How many times a failed run is retried.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The first retry delay.
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// The `State<T>` parameters it takes.
    pub fn states(&self) -> &'static [StateNeed] {
        self.states
    }

    /// When it ticks, for a periodic task (`#[task(every = ...)]`, `#[task(cron = ...)]`).
    pub fn schedule(&self) -> Option<Schedule> {
        self.schedule
    }

    /// Its signature fingerprint.
    pub fn signature(&self) -> &'static Signature {
        (self.signature)()
    }

    /// Where it is defined: `module::path (file.rs:line)`.
    pub fn location(&self) -> String {
        format!("{} ({}:{})", self.module_path, self.file, self.line)
    }

    /// `name(a: i64, b: i64) -> i64`.
    pub fn describe(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| format!("{}: {}", p.name, p.ty))
            .collect();
        format!("{}({}) -> {}", self.name, params.join(", "), self.output)
    }
}

/// Every task registered in this binary, sorted by name.
pub fn tasks() -> Vec<&'static Registration> {
    let mut tasks: Vec<_> = inventory::iter::<Registration>.into_iter().collect();
    tasks.sort_by(|a, b| {
        a.name
            .cmp(b.name)
            .then_with(|| a.location().cmp(&b.location()))
    });
    tasks
}

/// The tasks to serve: all, or those named in `filter`; refuses duplicates and an empty set.
pub(crate) fn select(
    all: &[&'static Registration],
    filter: Option<&[String]>,
) -> Result<Vec<&'static Registration>, Error> {
    let mut by_name: BTreeMap<&str, &'static Registration> = BTreeMap::new();
    for task in all {
        if let Some(first) = by_name.insert(task.name, task) {
            return Err(Error::DuplicateTask {
                name: task.name.to_owned(),
                first: first.location(),
                second: task.location(),
            });
        }
    }
    if by_name.is_empty() {
        return Err(Error::NoTasks(
            "no tasks are linked into this binary: define some with #[task], and for tasks in \
             another crate write `use that_crate as _;` so that the crate is linked"
                .to_owned(),
        ));
    }
    let Some(filter) = filter else {
        return Ok(by_name.into_values().collect());
    };
    let mut selected = Vec::new();
    for name in filter {
        match by_name.get(name.as_str()) {
            Some(task) => selected.push(*task),
            None => {
                return Err(Error::Config(format!(
                    "no task named `{name}` in this binary; it has: {}",
                    by_name.keys().copied().collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    if selected.is_empty() {
        return Err(Error::NoTasks("the task filter selects no task".to_owned()));
    }
    Ok(selected)
}
