//! Run with: cargo run -p amqp-tasks-examples --bin worker
//!
//! The consumer role: serves the math and text tasks of this crate's library. `--list` prints
//! them; `--help` shows the options (all also read from `AMQP_*` environment variables).

// The tasks register at link time: this line links the library that defines them.
use amqp_tasks_examples as _;

fn main() -> std::process::ExitCode {
    amqp_tasks::worker::main()
}
