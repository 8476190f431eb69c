//! The worker of the end-to-end tests: serves the tasks of `amqp_tasks_tests::tasks`, with the
//! state they take (`TEST_WORKER_GREETING`). `TEST_WORKER_NO_STATE` leaves the state out and
//! `TEST_WORKER_SETUP_FAILS` makes the set-up fail, for the tests of both.
use amqp_tasks_tests::tasks::Greeting;

fn main() -> std::process::ExitCode {
    amqp_tasks::worker::main_with(|worker| async move {
        if std::env::var_os("TEST_WORKER_SETUP_FAILS").is_some() {
            return Err("the database is down".into());
        }
        if std::env::var_os("TEST_WORKER_NO_STATE").is_some() {
            return Ok(worker);
        }
        let prefix = std::env::var("TEST_WORKER_GREETING").unwrap_or_else(|_| "hello, ".into());
        Ok(worker.state(Greeting { prefix }))
    })
}
