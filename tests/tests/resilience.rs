//! Failures survived: retries with backoff, delayed tasks, dead-letter tooling, poison messages,
//! quorum queues, connections closed by the broker.

use amqp_tasks::{CallError, Client};
use amqp_tasks_tests::harness::{
    PATIENCE, TestEnv, amqp_url, bounded, close_connections, eventually, eventually_async,
};
use amqp_tasks_tests::tasks::*;
use std::time::Duration;
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(90);

/// `run,attempt,unix_ms` lines written by `flaky`.
fn runs(path: &str) -> Vec<(u32, u32, u128)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let mut parts = line.split(',');
            let mut next = || parts.next().unwrap().parse::<u128>().unwrap();
            (next() as u32, next() as u32, next())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_fails_twice_then_succeeds_is_retried_with_backoff() {
    let env = TestEnv::new("retry");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "flaky"]).ready().await;
        let client = env.client().await;
        let path = env.path("flaky");
        assert_eq!(
            flaky::new(path.clone(), 2).call(&client).await,
            Ok(3),
            "the caller gets the success"
        );

        let runs = runs(&path);
        let attempts: Vec<u32> = runs.iter().map(|r| r.1).collect();
        assert_eq!(
            attempts,
            [1, 2, 3],
            "the attempt number reaches the handler"
        );
        // Backoff 300 ms, then 600 ms, ±20% jitter (the exact schedule is unit-tested in the
        // runtime), held in 100 ms buckets (so up to 100 ms early): the first retry within
        // 140..=360 ms and the second within 380..=720 ms, plus what a loaded machine adds (the
        // upper bounds allow 110 and 280 ms). A doubling off by one (600 then 1,200 ms) falls out.
        let first = runs[1].2 - runs[0].2;
        let second = runs[2].2 - runs[1].2;
        println!("retry delays: {first} ms and {second} ms (backoff 300 ms, then 600 ms)");
        assert!((140..=470).contains(&first), "first retry after {first} ms");
        assert!(
            (380..=1_000).contains(&second),
            "second retry after {second} ms (first after {first} ms)"
        );
        env.settled("flaky").await;
        assert_eq!(env.depth("flaky.dlq").await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_are_dead_lettered_with_their_history_then_replayed() {
    let env = TestEnv::new("exhausted");
    bounded(LIMIT, async {
        let worker = env
            .worker(WORKER, &["--tasks", "flaky,fatal"])
            .ready()
            .await;
        let client = env.client().await;
        let path = env.path("flaky");
        // Four attempts (1 + 3 retries) fail; the fifth run, after the replay, succeeds.
        let result = flaky::new(path.clone(), 4).call(&client).await;
        assert_eq!(
            result,
            Err(CallError::Task(FlakyError::NotYet { attempt: 4 }))
        );
        assert_eq!(runs(&path).len(), 4);

        // An error its type calls not retryable is not retried.
        let fatal_path = env.path("fatal");
        assert_eq!(
            fatal::new(fatal_path.clone()).call(&client).await,
            Err(CallError::Task(FlakyError::Fatal))
        );
        assert_eq!(
            std::fs::read_to_string(&fatal_path)
                .unwrap()
                .lines()
                .count(),
            1
        );

        env.settled("flaky").await;
        env.settled("fatal").await;
        assert_eq!(
            env.depth("fatal.dlq").await,
            1,
            "an error not worth retrying is dead-lettered at once"
        );
        let mut list = env.worker(WORKER, &["dlq", "list", "flaky"]);
        assert!(list.exit(PATIENCE).await.success(), "{}", list.output());
        let listing = list.output();
        assert!(listing.contains("1 dead letter(s)"), "{listing}");
        assert!(
            listing.contains("attempt 4: task") && listing.contains("failed after 4 attempt(s)"),
            "{listing}"
        );
        assert_eq!(
            listing.matches("before: attempt").count(),
            3,
            "the history of the earlier attempts: {listing}"
        );
        assert_eq!(
            env.depth("flaky.dlq").await,
            1,
            "listing leaves them in place"
        );

        let mut replay = env.worker(WORKER, &["dlq", "replay", "flaky"]);
        assert!(replay.exit(PATIENCE).await.success(), "{}", replay.output());
        assert!(replay.output().contains("replayed 1 message(s)"));
        let done = eventually("the replayed task to run", PATIENCE, || {
            let runs = runs(&path);
            (runs.len() == 5).then_some(runs)
        })
        .await;
        assert_eq!(done[4].1, 1, "a replay starts again at attempt 1");
        worker.wait_for("task succeeded").await;
        assert_eq!(env.depth("flaky.dlq").await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countdown_holds_the_task_in_the_broker() {
    let env = TestEnv::new("countdown");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "touch,add"]).ready().await;
        let client = env.client().await;
        let marker = env.path("later");
        let sent = Instant::now();
        touch::new(marker.clone(), 0)
            .countdown(Duration::from_millis(1_500))
            .delay(&client)
            .await
            .unwrap();
        // Held in the 800 ms bucket queue, not in the task queue or in a worker.
        let bucket = amqp_tasks::topology::delay_queue(Some(&env.namespace), 800);
        assert_eq!(
            env.depth(bucket.trim_start_matches(&format!("{}.", env.namespace)))
                .await,
            1
        );
        assert_eq!(env.depth("touch").await, 0);
        let started = format!("{marker}.started");
        eventually("the delayed task to run", PATIENCE, || {
            std::fs::metadata(&started).ok()
        })
        .await;
        let waited = sent.elapsed();
        assert!(
            waited >= Duration::from_millis(1_380) && waited < Duration::from_millis(3_000),
            "ran after {waited:?}"
        );

        // `.eta()`: not before the given time.
        let marker = env.path("at");
        let eta = std::time::SystemTime::now() + Duration::from_millis(1_200);
        let sent = Instant::now();
        touch::new(marker.clone(), 0)
            .eta(eta)
            .delay(&client)
            .await
            .unwrap();
        let started = format!("{marker}.started");
        eventually("the task with an eta to run", PATIENCE, || {
            std::fs::metadata(&started).ok()
        })
        .await;
        let waited = sent.elapsed();
        assert!(
            waited >= Duration::from_millis(1_080) && waited < Duration::from_millis(2_700),
            "ran after {waited:?}"
        );

        // A call can be delayed too, within its deadline.
        let called = Instant::now();
        assert_eq!(
            add::new(1, 2)
                .countdown(Duration::from_millis(500))
                .call(&client)
                .await,
            Ok(3)
        );
        assert!(
            called.elapsed() >= Duration::from_millis(380),
            "{:?}",
            called.elapsed()
        );
        let too_late = add::new(1, 2)
            .countdown(Duration::from_secs(5))
            .timeout(Duration::from_secs(1))
            .call(&client)
            .await;
        assert!(
            matches!(too_late, Err(CallError::Rejected(_))),
            "{too_late:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_is_scheduled_past_the_callers_deadline() {
    let env = TestEnv::new("retry-deadline");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "flaky"]).ready().await;
        let client = env.client().await;
        let path = env.path("flaky");
        // Attempt 1 fails at once; its retry is due 240..=360 ms later (it may start up to 100 ms
        // early, at the delay queues' resolution), within the 600 ms the caller waits. The next
        // retry would be due at least 480 ms after attempt 2, so at 620 ms or later: past the
        // deadline. It is not scheduled, and the caller hears attempt 2's error in time.
        let started = Instant::now();
        let result = flaky::new(path.clone(), 10)
            .timeout(Duration::from_millis(600))
            .call(&client)
            .await;
        assert_eq!(
            result,
            Err(CallError::Task(FlakyError::NotYet { attempt: 2 })),
            "after {:?}",
            started.elapsed()
        );
        // The task is dead-lettered with its history instead of sent on: once its queue is
        // settled, nothing of it waits anywhere to run a third time.
        env.settled("flaky").await;
        assert_eq!(env.depth("flaky.dlq").await, 1);
        let attempts: Vec<u32> = runs(&path).iter().map(|r| r.1).collect();
        assert_eq!(attempts, [1, 2]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_retried_when_the_task_asks() {
    let env = TestEnv::new("retry-panic");
    bounded(LIMIT, async {
        let _worker = env
            .worker(WORKER, &["--tasks", "panics_once"])
            .ready()
            .await;
        let client = env.client().await;
        let path = env.path("panics");
        assert_eq!(panics_once::new(path.clone()).call(&client).await, Ok(2));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n");
        env.settled("panics_once").await;
        assert_eq!(
            env.depth("panics_once.dlq").await,
            0,
            "retried, not dead-lettered"
        );
    })
    .await;
}

#[task(name = "nobody.serves.this")]
async fn orphan(x: u8) -> u8;

use amqp_tasks::task;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_without_a_queue_is_no_route() {
    let env = TestEnv::new("delay-no-route");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        let client = env.client().await;
        let result = orphan::new(1)
            .countdown(Duration::from_secs(2))
            .delay(&client)
            .await;
        assert_eq!(
            result,
            Err(CallError::NoRoute {
                queue: env.queue("nobody.serves.this")
            })
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_the_redelivery_limit() {
    for queue_type in ["classic", "quorum"] {
        let env = TestEnv::new(&format!("poison-{queue_type}"));
        bounded(LIMIT, async {
            let args = [
                "--tasks",
                "poison,add",
                "--max-redeliveries",
                "2",
                "--queue-type",
                queue_type,
            ];
            let client = env.client().await;
            let path = env.path("poison");
            let mut worker = env.worker(WORKER, &args).ready().await;
            poison::new(path.clone()).delay(&client).await.unwrap();
            // Each delivery kills the worker, which is restarted, until a worker dead-letters it.
            let mut crashes = 0;
            let mut outputs = Vec::new();
            let deadline = Instant::now() + LIMIT;
            loop {
                assert!(
                    Instant::now() < deadline,
                    "{queue_type}: neither crashed nor dead-lettered"
                );
                if worker.has_exited() {
                    assert!(
                        !worker.exit(PATIENCE).await.success(),
                        "the poison aborts the worker"
                    );
                    crashes += 1;
                    outputs.push(worker.output());
                    assert!(crashes <= 10, "{queue_type}: crash loop");
                    worker = env.worker(WORKER, &args).ready().await;
                } else if env.depth("poison.dlq").await == 1 {
                    break;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            assert_eq!(
                crashes,
                3,
                "{queue_type}: dead-lettered after the first delivery and 2 redeliveries:\n{}",
                outputs.join("\n=====\n")
            );
            assert_eq!(env.depth("poison.dlq").await, 1);
            let mut list = env.worker(WORKER, &["dlq", "list", "poison"]);
            list.exit(PATIENCE).await;
            assert!(
                list.output().contains("too_many_redeliveries"),
                "{}",
                list.output()
            );
            assert_eq!(
                add::new(2, 2).call(&client).await,
                Ok(4),
                "{queue_type}: the worker serves on"
            );
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_are_declared_when_asked() {
    let env = TestEnv::new("quorum");
    bounded(LIMIT, async {
        let _worker = env
            .worker(WORKER, &["--tasks", "add", "--queue-type", "quorum"])
            .ready()
            .await;
        let client = env.client().await;
        assert_eq!(add::new(40, 2).call(&client).await, Ok(42));
        // Declaring it as a classic queue now fails: it is a quorum queue.
        let raw = env.raw().await;
        let mut classic = lapin::types::FieldTable::default();
        classic.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("classic".into()),
        );
        let declared = raw
            .channel
            .queue_declare(
                env.queue("add").as_str().into(),
                lapin::options::QueueDeclareOptions::durable(),
                classic,
            )
            .await;
        assert!(declared.is_err(), "the queue is a quorum queue");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_worker_survive_their_connection_being_closed() {
    let env = TestEnv::new("conn-drop");
    bounded(LIMIT, async {
        let worker = env
            .worker(WORKER, &["--tasks", "sleep_ms,add"])
            .ready()
            .await;
        let marker = format!("conn-drop-client-{}", uuid::Uuid::new_v4().simple());
        let client = Client::builder(amqp_url())
            .namespace(env.namespace.clone())
            .connection_name(marker.clone())
            .connect()
            .await
            .unwrap();
        let call = tokio::spawn({
            let client = client.clone();
            async move { sleep_ms::new(10_000).call(&client).await }
        });
        worker.wait_for("task started").await;
        let dropped = Instant::now();
        assert_eq!(close_connections(&marker).await, 1);
        let result = call.await.unwrap();
        assert!(
            matches!(result, Err(CallError::ConnectionLost(_))),
            "{result:?}"
        );
        assert!(
            dropped.elapsed() < Duration::from_secs(5),
            "failed promptly: {:?}",
            dropped.elapsed()
        );
        assert_eq!(
            add::new(1, 1).call(&client).await,
            Ok(2),
            "the client reconnects"
        );

        // The worker's own connection: it resumes without a restart.
        assert_eq!(close_connections(&format!("pid {}", worker.pid())).await, 1);
        worker.wait_for("consumers stopped; resuming").await;
        let answer = eventually_async(|| async {
            add::new(2, 3)
                .timeout(Duration::from_secs(2))
                .call(&client)
                .await
                .ok()
        })
        .await;
        assert_eq!(answer, 5);
        assert_eq!(worker.output().matches("worker ready").count(), 2);
    })
    .await;
}
