//! Run with: cargo run -p amqp-tasks-examples --bin worker
//!
//! The consumer role: serves the math and text tasks of this crate's library. `--list` prints
//! them; `--help` shows the options (all also read from `AMQP_*` environment variables).
//! `GREETING` sets the word the `greet` task says hello with (its state).

use amqp_tasks_examples::text::Greetings;

fn main() -> std::process::ExitCode {
    // The tasks register at link time: naming the library (here, through its `Greetings`) links
    // it. The set-up gives the tasks that take a `State<Greetings>` their value.
    amqp_tasks::worker::main_with(|worker| async move {
        let hello = std::env::var("GREETING").unwrap_or_else(|_| "hello".to_owned());
        Ok(worker.state(Greetings { hello }))
    })
}
