//! [`State`]: the application's resources (a database pool, an HTTP client, a configuration)
//! given to the tasks that take them, in the spirit of axum's extractors. A worker holds one
//! value per type ([`States`]); a task parameter `State<T>` receives a shared handle on it. What
//! each task needs is known from its registration ([`StateNeed`]), so that a worker missing one
//! refuses to build instead of failing per message.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A shared value of the application, given to a task that takes a `State<T>` parameter:
///
/// ```no_run
/// use amqp_tasks::{task, State};
///
/// pub struct Db { /* a pool */ }
///
/// #[task]
/// pub async fn count_orders(db: State<Db>, customer: String) -> u64 {
///     let _pool: &Db = &db; // derefs to the value the worker was given
///     0
/// }
///
/// # async fn serve(client: amqp_tasks::Client) -> Result<(), amqp_tasks::Error> {
/// amqp_tasks::Worker::builder(client)
///     .state(Db {})
///     .serve(std::future::pending())
///     .await
/// # }
/// ```
///
/// `State` parameters come after the [`Context`](crate::Context), if any, and before the task's
/// arguments. They are not part of the stub (callers never see them) nor of the signature
/// fingerprint. A task may take several, of different types. Cloning is cheap (an [`Arc`]).
pub struct State<T: ?Sized>(Arc<T>);

impl<T> State<T> {
    /// A state holding `value` (what [`WorkerBuilder::state`](crate::WorkerBuilder::state) does
    /// with what it is given; useful to call a task function directly in a unit test).
    pub fn new(value: T) -> State<T> {
        State(Arc::new(value))
    }
}

impl<T: ?Sized> State<T> {
    /// A state sharing this `Arc`.
    pub fn from_arc(value: Arc<T>) -> State<T> {
        State(value)
    }

    /// The shared handle.
    pub fn arc(&self) -> &Arc<T> {
        &self.0
    }
}

impl<T: ?Sized> Deref for State<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized> Clone for State<T> {
    fn clone(&self) -> Self {
        State(self.0.clone())
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for State<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("State").field(&&*self.0).finish()
    }
}

/// What a type must be to be shared state.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the state of a task",
    label = "must be `Send + Sync + 'static`",
    note = "tasks run on several threads at once and share one value: wrap what is not `Sync` in a `Mutex`"
)]
pub trait StateValue: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> StateValue for T {}

/// The values a worker (or a test worker) was given, one per type.
#[derive(Clone, Default)]
pub(crate) struct States {
    values: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl States {
    /// Adds (or replaces) the value of its type.
    pub(crate) fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.insert_arc(Arc::new(value));
    }

    pub(crate) fn insert_arc<T: Send + Sync + 'static>(&mut self, value: Arc<T>) {
        self.values.insert(TypeId::of::<T>(), value);
    }

    pub(crate) fn get<T: Send + Sync + 'static>(&self) -> Option<State<T>> {
        let value = self.values.get(&TypeId::of::<T>())?.clone();
        value.downcast::<T>().ok().map(State)
    }

    pub(crate) fn has(&self, need: &StateNeed) -> bool {
        self.values.contains_key(&(need.type_id)())
    }

    /// The first of a task's needs that is missing here.
    pub(crate) fn missing<'a>(&self, needs: &'a [StateNeed]) -> Option<&'a StateNeed> {
        needs.iter().find(|need| !self.has(need))
    }
}

impl fmt::Debug for States {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("States")
            .field("values", &self.values.len())
            .finish()
    }
}

/// A `State<T>` parameter of a task, as `#[task]` records it.
#[derive(Debug, Clone, Copy)]
pub struct StateNeed {
    /// `TypeId::of::<T>`.
    pub type_id: fn() -> TypeId,
    /// `T` as written.
    pub name: &'static str,
}

/// A state a task needs was not given to the worker running it (which its builder refuses, so a
/// handler only sees this where that check was bypassed).
#[derive(Debug, Clone)]
pub struct MissingState {
    /// The task.
    pub task: &'static str,
    /// The type, as written.
    pub state: &'static str,
}

impl fmt::Display for MissingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "task \"{}\" needs State<{}>, which was not given",
            self.task, self.state
        )
    }
}
