//! Arithmetic tasks.

use amqp_tasks::task;
use serde::{Deserialize, Serialize};

/// Adds two numbers. Its task name defaults to the function's: `add`.
#[task]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Sums a list.
#[task]
pub async fn sum(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Why a division failed: travels to the caller intact, as `CallError::Task(DivError)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum DivError {
    /// The divisor was zero.
    #[error("division by zero")]
    ByZero,
}

/// Integer division, under an explicit name other services can rely on.
#[task(name = "math.div", timeout = "5s")]
pub async fn div(a: i64, b: i64) -> Result<i64, DivError> {
    if b == 0 {
        return Err(DivError::ByZero);
    }
    Ok(a / b)
}
