//! Run with: cargo run -p amqp-tasks-examples --bin relay
//!
//! The relay role: a second service whose task calls the `worker` service's tasks while it runs,
//! through its `Context` (inheriting the caller's deadline and trace). It does not link the
//! worker's code: it declares the tasks it calls, with types of its own.

use amqp_tasks::{CallError, Context, task};
use serde::{Deserialize, Serialize};

/// This service's view of the worker's error type (compared by name, not path).
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum DivError {
    #[error("division by zero")]
    ByZero,
}

#[task]
pub async fn sum(xs: Vec<i64>) -> i64;

#[task(name = "math.div")]
pub async fn div(a: i64, b: i64) -> Result<i64, DivError>;

/// The mean of a list, computed by calling two tasks of the worker service.
#[task(name = "stats.average")]
pub async fn average(ctx: Context, xs: Vec<i64>) -> Result<i64, String> {
    let n = xs.len() as i64;
    let total = sum::new(xs)
        .call(&ctx)
        .await
        .map_err(|e| format!("sum: {e}"))?;
    match div::new(total, n).call(&ctx).await {
        Ok(mean) => Ok(mean),
        Err(CallError::Task(DivError::ByZero)) => Err("the average of nothing is undefined".into()),
        Err(error) => Err(format!("div: {error}")),
    }
}

fn main() -> std::process::ExitCode {
    amqp_tasks::worker::main()
}

#[cfg(test)]
mod tests {
    use super::*;
    use amqp_tasks::testing::TestWorker;

    /// The relay's logic, tested without a broker: the worker service's tasks are mocks.
    #[tokio::test]
    async fn average_calls_sum_and_div() {
        let test = TestWorker::new()
            .mock::<sum>(|(xs,)| async move { Ok(xs.iter().sum()) })
            .mock::<div>(|(a, b)| async move {
                if b == 0 {
                    Err(DivError::ByZero)
                } else {
                    Ok(a / b)
                }
            });
        assert_eq!(average::new(vec![2, 4, 9]).call(&test).await, Ok(5));
        assert_eq!(
            average::new(vec![]).call(&test).await,
            Err(CallError::Task(
                "the average of nothing is undefined".to_owned()
            ))
        );
    }
}
