//! A worker's life: start-up checks, `--list`, SIGKILL mid-task, SIGTERM drain, lost connections.

use amqp_tasks::CallError;
use amqp_tasks_tests::harness::{
    PATIENCE, TestEnv, WorkerProcess, bounded, concurrently, eventually, touch_started,
};
use amqp_tasks_tests::tasks::*;
use std::time::Duration;
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const DUPLICATE: &str = env!("CARGO_BIN_EXE_test-dup");
const EMPTY: &str = env!("CARGO_BIN_EXE_test-empty");
const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_every_task_with_arguments_and_queue() {
    let env = TestEnv::new("list");
    bounded(LIMIT, async {
        let mut lister = env.worker(WORKER, &["--list"]);
        assert!(lister.exit(PATIENCE).await.success());
        let output = lister.output();
        for expected in [
            "add(a: i64, b: i64) -> i64".to_owned(),
            "math.div(a: i64, b: i64) -> Result<i64, DivError>".to_owned(),
            "greet(name: String, times: u32, suffix: Option<String>) -> String".to_owned(),
            format!("queue: {}", env.queue("math.div")),
            "defined in amqp_tasks_tests::tasks".to_owned(),
        ] {
            assert!(output.contains(&expected), "`{expected}` in:\n{output}");
        }
        // Listing connects to nothing and declares nothing.
        assert!(!output.contains("worker ready"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_with_two_tasks_of_one_name_refuses_to_start() {
    let env = TestEnv::new("duplicates");
    bounded(LIMIT, async {
        let mut worker = env.worker(DUPLICATE, &[]);
        let status = worker.exit(PATIENCE).await;
        assert_eq!(status.code(), Some(1));
        let output = worker.output();
        assert!(output.contains("two tasks are named `add`"), "{output}");
        assert!(
            output.contains("tests/src/tasks.rs") && output.contains("test-dup.rs"),
            "names both: {output}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_tasks_refuses_to_start() {
    let env = TestEnv::new("empty");
    bounded(LIMIT, async {
        let mut worker = env.worker(EMPTY, &[]);
        assert_eq!(worker.exit(PATIENCE).await.code(), Some(1));
        assert!(
            worker
                .output()
                .contains("no tasks are linked into this binary"),
            "{}",
            worker.output()
        );

        let mut filtered = env.worker(WORKER, &["--tasks", "nope"]);
        assert_eq!(filtered.exit(PATIENCE).await.code(), Some(1));
        assert!(
            filtered.output().contains("no task named `nope`"),
            "{}",
            filtered.output()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_loses_nothing() {
    let env = TestEnv::new("sigkill");
    bounded(LIMIT, async {
        let args = ["--tasks", "note_delivery"];
        let mut first = env.worker(WORKER, &args).ready().await;
        let client = env.client().await;
        let path = env.path("killed");
        note_delivery::new(path.clone(), 2_000)
            .delay(&client)
            .await
            .expect("delay");
        let runs = || std::fs::read_to_string(&path).unwrap_or_default();
        eventually("the task to start", PATIENCE, || {
            (!runs().is_empty()).then_some(())
        })
        .await;
        first.signal("KILL");
        first.exit(PATIENCE).await;
        let done = format!("{path}.done");
        assert!(
            std::fs::metadata(&done).is_err(),
            "killed before it finished"
        );

        let second = env.worker(WORKER, &args).ready().await;
        let pids = eventually("the redelivered task to finish", PATIENCE, || {
            std::fs::read_to_string(&done).ok()
        })
        .await;
        assert_eq!(
            pids.trim(),
            second.pid().to_string(),
            "run to completion once, by the second worker"
        );
        // Each run saw whether it was a redelivery: the first did not, the second did.
        let lines: Vec<String> = runs().lines().map(str::to_owned).collect();
        assert_eq!(
            lines,
            [
                format!("{} 1 false", first.pid()),
                format!("{} 1 true", second.pid())
            ]
        );
        env.settled("note_delivery").await;
        assert_eq!(env.depth("note_delivery.dlq").await, 0);
    })
    .await;
}

async fn count(worker: &WorkerProcess, needle: &str) -> usize {
    worker.output().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_returns_unstarted_tasks() {
    drains_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_returns_unstarted_tasks() {
    drains_on("INT").await;
}

async fn drains_on(signal: &str) {
    let env = TestEnv::new(&format!("sig{}", signal.to_lowercase()));
    bounded(LIMIT, async {
        let mut first = env
            .worker(
                WORKER,
                &[
                    "--tasks",
                    "sleep_ms",
                    "--concurrency",
                    "1",
                    "--prefetch",
                    "10",
                ],
            )
            .ready()
            .await;
        let client = env.client().await;
        let calls = tokio::spawn({
            let client = client.clone();
            async move {
                concurrently(&client, 4, |client, _| async move {
                    sleep_ms::new(700)
                        .timeout(Duration::from_secs(20))
                        .call(&client)
                        .await
                })
                .await
            }
        });
        first.wait_for("task started").await;
        first.signal(signal);
        let status = first.exit(PATIENCE).await;
        assert!(
            status.success(),
            "exit 0 after a clean drain: {status:?}\n{}",
            first.output()
        );
        assert_eq!(
            count(&first, "task started").await,
            1,
            "one in flight, the rest not started"
        );
        assert_eq!(
            count(&first, "task succeeded").await,
            1,
            "the one in flight finished"
        );
        assert!(first.output().contains("worker stopped"));
        // Nobody consumes the queue now: what is in it is what the worker gave back. The three
        // it had not started, and not the one it finished during the drain, whose ack went out
        // before it exited (unacked, it would be back in the queue too).
        assert_eq!(env.depth("sleep_ms").await, 3);

        // The prefetched ones went back to the queue, for the next worker.
        let _second = env.worker(WORKER, &["--tasks", "sleep_ms"]).ready().await;
        assert_eq!(calls.await.unwrap(), vec![Ok(700); 4]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_calls_keep_working_while_draining() {
    let env = TestEnv::new("drain-relay");
    bounded(LIMIT, async {
        let mut relay = env.worker(WORKER, &["--tasks", "relay_slow"]).ready().await;
        let _downstream = env.worker(WORKER, &["--tasks", "sleep_ms"]).ready().await;
        let client = env.client().await;
        let call = tokio::spawn({
            let client = client.clone();
            async move { relay_slow::new(1_000).call(&client).await }
        });
        relay.wait_for("task started").await;
        relay.signal("TERM");
        assert_eq!(call.await.unwrap(), Ok(1_000));
        assert!(relay.exit(PATIENCE).await.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_that_runs_out_exits_non_zero_and_loses_nothing() {
    let env = TestEnv::new("grace");
    bounded(LIMIT, async {
        let mut first = env
            .worker(WORKER, &["--tasks", "touch", "--grace", "300ms"])
            .ready()
            .await;
        let client = env.client().await;
        let marker = touch_started(&env, &client, "grace", 3_000).await;
        let asked = Instant::now();
        first.signal("TERM");
        let status = first.exit(PATIENCE).await;
        assert_eq!(status.code(), Some(3), "{}", first.output());
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "did not wait for the task: {:?}\n{}",
            asked.elapsed(),
            first.output()
        );
        assert!(first.output().contains("grace period"));

        let second = env.worker(WORKER, &["--tasks", "touch"]).ready().await;
        let done = format!("{marker}.done");
        let pids = eventually("the task to run again", PATIENCE, || {
            std::fs::read_to_string(&done).ok()
        })
        .await;
        assert_eq!(
            pids.trim(),
            second.pid().to_string(),
            "first:\n{}\nsecond:\n{}",
            first.output(),
            second.output()
        );
        env.settled("touch").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_on_a_closed_connection_fail_at_once() {
    let env = TestEnv::new("conn-closed");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "sleep_ms"]).ready().await;
        let client = env.client().await;
        let call = tokio::spawn({
            let client = client.clone();
            async move { sleep_ms::new(5_000).call(&client).await }
        });
        _worker.wait_for("task started").await;
        let closed = Instant::now();
        client.close().await;
        let result = call.await.unwrap();
        assert!(
            matches!(result, Err(CallError::ConnectionLost(_))),
            "{result:?}"
        );
        assert!(
            closed.elapsed() < Duration::from_secs(1),
            "failed at once: {:?}",
            closed.elapsed()
        );
        // The next call opens a new connection.
        assert_eq!(sleep_ms::new(1).call(&client).await, Ok(1));
    })
    .await;
}
