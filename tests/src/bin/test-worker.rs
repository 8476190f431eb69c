//! The worker of the end-to-end tests: serves the tasks of `amqp_tasks_tests::tasks`.
use amqp_tasks_tests as _;

fn main() -> std::process::ExitCode {
    amqp_tasks::worker::main()
}
