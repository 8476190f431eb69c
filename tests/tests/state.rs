//! State, the worker's set-up, and the test worker measured against a real one.
//!
//! - A task receives the state its worker process was given through `main_with`; a worker that
//!   lacks a state one of its tasks needs refuses to start, naming both; a failing set-up is
//!   reported (and `--list` does not run it).
//! - Calls may wait longer than their task runs: a `.timeout()` past the task's time limit, a
//!   countdown past it.
//! - `TestWorker` answers every case exactly as a real worker process does.

use amqp_tasks::testing::TestWorker;
use amqp_tasks::{Caller, DynamicCall};
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, bounded};
use amqp_tasks_tests::tasks::*;
use std::time::Duration;
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_receives_the_state_its_worker_was_given() {
    let env = TestEnv::new("state-given");
    bounded(LIMIT, async {
        let worker = env
            .worker_with_env(
                WORKER,
                &["--tasks", "greet_with"],
                &[("TEST_WORKER_GREETING", "bonjour ")],
            )
            .ready()
            .await;
        let client = env.client().await;
        for name in ["ann", "bob"] {
            assert_eq!(
                greet_with::new(name.into()).call(&client).await,
                Ok(format!("bonjour {name}"))
            );
        }
        drop(worker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_needed_state_refuses_to_start() {
    let env = TestEnv::new("state-missing");
    bounded(LIMIT, async {
        let mut refused = env.worker_with_env(
            WORKER,
            &["--tasks", "add,greet_with"],
            &[("TEST_WORKER_NO_STATE", "1")],
        );
        let status = refused.exit(PATIENCE).await;
        let output = refused.output();
        assert_eq!(status.code(), Some(1), "{output}");
        assert!(
            output.contains(
                "task \"greet_with\" needs State<Greeting>: add it with WorkerBuilder::state"
            ),
            "{output}"
        );
        assert!(!output.contains("worker ready"), "{output}");
        // Nothing was declared: it refused before serving.
        assert_eq!(
            env.client().await.queue_status("greet_with").await.unwrap(),
            None
        );
        // Tasks that need no state are served without it.
        let worker = env
            .worker_with_env(
                WORKER,
                &["--tasks", "add"],
                &[("TEST_WORKER_NO_STATE", "1")],
            )
            .ready()
            .await;
        assert_eq!(add::new(2, 2).call(&env.client().await).await, Ok(4));
        drop(worker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_set_up_is_reported_and_list_does_not_run_it() {
    let env = TestEnv::new("state-setup");
    bounded(LIMIT, async {
        let mut failing = env.worker_with_env(
            WORKER,
            &["--tasks", "add"],
            &[("TEST_WORKER_SETUP_FAILS", "1")],
        );
        let status = failing.exit(PATIENCE).await;
        let output = failing.output();
        assert_eq!(status.code(), Some(1), "{output}");
        assert!(
            output.contains("the worker's set-up failed: the database is down"),
            "{output}"
        );
        let mut listing =
            env.worker_with_env(WORKER, &["--list"], &[("TEST_WORKER_SETUP_FAILS", "1")]);
        let status = listing.exit(PATIENCE).await;
        let output = listing.output();
        assert_eq!(status.code(), Some(0), "{output}");
        assert!(
            output.contains("greet_with(name: String) -> String"),
            "{output}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_may_wait_longer_than_their_task_runs() {
    let env = TestEnv::new("state-timeouts");
    bounded(LIMIT, async {
        let worker = env
            .worker(WORKER, &["--tasks", "sleep_ms,quick", "--concurrency", "1"])
            .ready()
            .await;
        let client = env.client().await;
        // The only slot is busy for 2.5 s; `quick` (a 1 s time limit) waits behind it.
        sleep_ms::new(2_500).delay(&client).await.unwrap();
        let started = Instant::now();
        let answered = quick::new(5)
            .timeout(Duration::from_secs(8))
            .call(&client)
            .await;
        assert_eq!(answered, Ok(5));
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // A countdown past the time limit: the default deadline waits for it.
        let started = Instant::now();
        assert_eq!(
            quick::new(6)
                .countdown(Duration::from_millis(2_500))
                .call(&client)
                .await,
            Ok(6)
        );
        assert!(
            started.elapsed() >= Duration::from_millis(2_400),
            "{:?}",
            started.elapsed()
        );
        drop(worker);
    })
    .await;
}

/// The cases both workers answer: each result as text, the namespace taken out.
async fn cases(caller: &impl Caller, dir: &str, namespace: &str) -> Vec<String> {
    let path = |name: &str| format!("{dir}/{name}");
    let mut out = vec![
        format!("{:?}", add::new(2, 3).call(caller).await),
        format!("{:?}", div::new(1, 0).call(caller).await),
        format!("{:?}", boom::new("kaput".into()).call(caller).await),
        format!(
            "{:?}",
            overrun_write::new(path("overrun"), 2_000)
                .call(caller)
                .await
        ),
        format!("{:?}", fatal::new(path("fatal")).call(caller).await),
        format!("{:?}", flaky::new(path("flaky"), 2).call(caller).await),
        format!("{:?}", greet_with::new("ann".into()).call(caller).await),
        format!(
            "{:?}",
            quick::new(7)
                .countdown(Duration::from_millis(1_500))
                .call(caller)
                .await
        ),
        format!(
            "{:?}",
            DynamicCall::new("add", serde_json::json!({"a": 1}))
                .call(caller)
                .await
        ),
        format!(
            "{:?}",
            DynamicCall::new("greet", serde_json::json!({"name": "x", "times": "two"}))
                .call(caller)
                .await
        ),
        format!(
            "{:?}",
            DynamicCall::new("nobody.serves.this", serde_json::json!({}))
                .call(caller)
                .await
        ),
    ];
    for line in &mut out {
        *line = line.replace(&format!("{namespace}."), "");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_worker_answers_as_a_real_worker_does() {
    let env = TestEnv::new("state-parity");
    bounded(LIMIT, async {
        let worker = env.worker(WORKER, &[]).ready().await;
        let client = env.client().await;
        let real_dir = env.path("real");
        let test_dir = env.path("test");
        std::fs::create_dir_all(&real_dir).unwrap();
        std::fs::create_dir_all(&test_dir).unwrap();

        let real = cases(&client, &real_dir, &env.namespace).await;
        let test = TestWorker::new().state(Greeting {
            prefix: "hello, ".into(),
        });
        let local = cases(&test, &test_dir, &env.namespace).await;
        for (real, local) in real.iter().zip(&local) {
            assert_eq!(real, local, "a real worker and the test worker differ");
        }
        assert_eq!(real.len(), local.len());
        println!("parity cases:\n{}", real.join("\n"));
        // They ran the same handlers as often: flaky three times, fatal once.
        for (file, runs) in [("flaky", 3), ("fatal", 1)] {
            let count = |dir: &str| {
                std::fs::read_to_string(format!("{dir}/{file}"))
                    .unwrap_or_default()
                    .lines()
                    .count()
            };
            assert_eq!((count(&real_dir), count(&test_dir)), (runs, runs), "{file}");
        }
        drop(worker);
    })
    .await;
}
