//! Benchmarks of amqp-tasks against a raw lapin program doing the same work with the same
//! guarantees, both measured in one run against the same RabbitMQ (see `BENCHMARKS.md`).
//!
//! The `amqp-tasks-bench` binary is the driver (producer side) and, started again by itself with
//! [`ROLE_ENV`] set, the worker processes of both sides: `worker` runs
//! `amqp_tasks::worker::main()` serving the tasks of [`tasks`], `raw-worker` runs
//! [`raw::worker_main`].

pub mod chart;
pub mod cpu;
pub mod peers;
pub mod procs;
pub mod raw;
pub mod scenarios;
pub mod stats;
pub mod tasks;

/// The environment variable that turns the binary into a worker process: `worker` (amqp-tasks)
/// or `raw-worker` (raw lapin).
pub const ROLE_ENV: &str = "AMQP_TASKS_BENCH_ROLE";

/// Any error of the bench.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A result of the bench.
pub type Res<T> = Result<T, Error>;
