//! The `amqp-tasks` shell client, built in this package so that its tests can run it
//! (`CARGO_BIN_EXE_*` names only binaries of the package under test); the same one-line `main`
//! as `amqp-tasks/src/bin/amqp-tasks.rs`.

fn main() -> std::process::ExitCode {
    amqp_tasks::shell::main()
}
