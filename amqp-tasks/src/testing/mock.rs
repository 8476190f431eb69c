//! Mocks: a test's function serving a task in place of its handler. The function is kept among
//! the test worker's states (one per task type), and the task's registration runs it through the
//! worker's execute stage, so that a mock is decoded, timed, retried and caught like a handler.

use crate::context::Context;
use crate::protocol::codec::Codec;
use crate::state::{MissingState, States};
use crate::task::Task;
use crate::worker::execute::{self, Outcome};
use crate::worker::registry::Registration;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

type MockFuture<T> =
    Pin<Box<dyn Future<Output = Result<<T as Task>::Output, <T as Task>::Error>> + Send + 'static>>;

/// What can mock task `T`: a function of its argument tuple (`|(order,)|` for one argument)
/// returning a future of its result. Implemented for every such closure.
#[diagnostic::on_unimplemented(
    message = "this cannot mock the task `{T}`",
    label = "not a mock of `{T}`",
    note = "a mock takes the task's argument tuple (`|(order,)|` for one argument) and returns a `Send` future of `Result<Output, Error>`: `|(a, b)| async move {{ Ok(a + b) }}`"
)]
pub trait Mock<T: Task>: Fn(T::Args) -> <Self as Mock<T>>::Future + Send + Sync + 'static {
    /// The future it returns.
    type Future: Future<Output = Result<T::Output, T::Error>> + Send + 'static;
}

// (`Fn` as a supertrait is what lets the compiler infer a closure's argument types from `T`.)
impl<T, F, Fut> Mock<T> for F
where
    T: Task,
    F: Fn(T::Args) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T::Output, T::Error>> + Send + 'static,
{
    type Future = Fut;
}

/// The mock of task `T`.
struct MockOf<T: Task> {
    serve: Arc<dyn Fn(T::Args) -> MockFuture<T> + Send + Sync>,
}

/// Keeps `mock` as the mock of `T`.
pub(super) fn install<T: Task>(states: &mut States, mock: impl Mock<T>) {
    let serve: Arc<dyn Fn(T::Args) -> MockFuture<T> + Send + Sync> =
        Arc::new(move |args| Box::pin(mock(args)) as MockFuture<T>);
    states.insert(MockOf::<T> { serve });
}

/// The registration that serves `T` with its mock.
pub(super) fn registration<T: Task>() -> Registration {
    Registration::substitute::<T>(run::<T>)
}

fn run<T: Task>(
    ctx: Context,
    codec: Codec,
    body: &[u8],
) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    execute::run_with::<T, _, _>(ctx, codec, body, |ctx, args| {
        let mock = ctx.state::<MockOf<T>>().ok_or(MissingState {
            task: T::NAME,
            state: "its mock",
        })?;
        Ok((mock.serve)(args))
    })
}
