//! A worker binary with two tasks named `add`: it must refuse to start, naming both.
use amqp_tasks_tests as _;

#[amqp_tasks::task(name = "add")]
async fn another_add(a: i64, b: i64) -> i64 {
    a - b
}

fn main() -> std::process::ExitCode {
    amqp_tasks::worker::main()
}
