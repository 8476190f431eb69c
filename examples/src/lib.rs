//! The tasks of the example `worker` service: plain, fallible and text tasks.
//!
//! A binary serves them by linking this crate: `use amqp_tasks_examples as _;`.

pub mod math;
pub mod text;
