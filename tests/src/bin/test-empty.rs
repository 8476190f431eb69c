//! A worker binary that links no task: it must refuse to start.
fn main() -> std::process::ExitCode {
    amqp_tasks::worker::main()
}
