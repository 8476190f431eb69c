//! `amqp-tasks call <task> '<json args>'` and `amqp-tasks queues <task>...`: see
//! [`amqp_tasks::shell`] for the options and exit codes.

fn main() -> std::process::ExitCode {
    amqp_tasks::shell::main()
}
