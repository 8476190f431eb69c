//! Chaos: failures caused for real, with every task counted. These tests act on the shared broker
//! (one restarts RabbitMQ), so they run one at a time, in this test target of their own, and
//! leave the broker running.
//!
//! Run with `cargo test -p amqp-tasks-tests --test chaos -- --nocapture` to see the figures.

use amqp_tasks::{CallError, Client, Codec};
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, amqp_url, bounded, eventually, rabbitmqctl};
use amqp_tasks_tests::tasks::*;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");

/// One chaos test at a time: they share (and one restarts) the broker.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How many times each number was recorded.
fn recorded(path: &str) -> BTreeMap<u64, u32> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Ok(n) = line.parse() {
            *counts.entry(n).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_worker_twice_loses_no_task() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new("chaos-kill");
    bounded(Duration::from_secs(180), async {
        const TASKS: u64 = 5_000;
        let args = ["--tasks", "record", "--concurrency", "32", "--prefetch", "64"];
        let mut worker = env.worker(WORKER, &args).ready().await;
        let client = env.client().await;
        let path = env.path("records");

        let sender = tokio::spawn({
            let (client, path) = (client.clone(), path.clone());
            async move {
                for chunk in (0..TASKS).collect::<Vec<_>>().chunks(250) {
                    let sends = chunk.iter().map(|n| {
                        let (client, path, n) = (client.clone(), path.clone(), *n);
                        async move { record::new(path, n).delay(&client).await }
                    });
                    for sent in futures_join(sends).await {
                        sent.expect("the broker is up: every delay is confirmed");
                    }
                }
            }
        });
        let mut kills = 0;
        for threshold in [1_500, 3_000] {
            let lines = || std::fs::read_to_string(&path).map(|t| t.lines().count()).unwrap_or(0);
            eventually("progress before the kill", PATIENCE * 2, || (lines() >= threshold).then_some(())).await;
            worker.signal("KILL");
            worker.exit(PATIENCE).await;
            kills += 1;
            worker = env.worker(WORKER, &args).ready().await;
        }
        sender.await.unwrap();
        eventually("every task to be recorded", PATIENCE * 4, || {
            (recorded(&path).len() as u64 == TASKS).then_some(())
        })
        .await;
        // Every delivery acked, then the counts are final.
        env.settled("record").await;
        let counts = recorded(&path);
        let runs: u32 = counts.values().sum();
        let duplicated = counts.values().filter(|c| **c > 1).count();
        let dead = env.depth("record.dlq").await;
        println!(
            "chaos kill: sent {TASKS}, executed {} distinct in {runs} runs, {duplicated} duplicated \
             (run again after {kills} SIGKILLs), dead-lettered {dead}",
            counts.len(),
        );
        assert!(counts.keys().copied().eq(0..TASKS));
        // Only tasks a killed worker had received but not acked run twice: at most its
        // prefetch window per kill.
        assert!(duplicated <= 2 * 64, "{duplicated} duplicates");
        assert_eq!(dead, 0);
    })
    .await;
}

/// Awaits all futures, concurrently, in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task"));
    }
    outputs
}

/// Starts the broker's application again whatever happens to the test.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

async fn broker_answers() -> bool {
    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .map(|c| drop(c.close(200, "probe".into())))
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_confirmed_task_and_hangs_no_call() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new("chaos-restart");
    let _guard = BrokerGuard;
    bounded(Duration::from_secs(240), async {
        const TASKS: u64 = 3_000;
        let worker = env.worker(WORKER, &["--tasks", "record,add"]).ready().await;
        let client = Client::builder(amqp_url())
            .namespace(env.namespace.clone())
            .confirm_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        let path = env.path("records");

        // A stream of .delay()s, 20 at a time, each outcome kept.
        let delays = tokio::spawn({
            let (client, path) = (client.clone(), path.clone());
            async move {
                let mut outcomes = Vec::new();
                for chunk in (0..TASKS).collect::<Vec<_>>().chunks(20) {
                    let sends = chunk.iter().map(|n| {
                        let (client, path, n) = (client.clone(), path.clone(), *n);
                        async move { (n, record::new(path, n).delay(&client).await) }
                    });
                    outcomes.extend(futures_join(sends).await);
                    tokio::time::sleep(Duration::from_millis(2)).await; // a stream, not a burst
                }
                outcomes
            }
        });
        // And a stream of .call()s, each timed.
        let (stop_calls, calls_stopped) = tokio::sync::watch::channel(false);
        let calls = tokio::spawn({
            let client = client.clone();
            async move {
                let mut outcomes = Vec::new();
                while !*calls_stopped.borrow() {
                    let started = Instant::now();
                    let result = add::new(1, 2)
                        .timeout(Duration::from_secs(3))
                        .call(&client)
                        .await;
                    outcomes.push((result, started.elapsed()));
                }
                outcomes
            }
        });

        eventually("a third of the tasks recorded", PATIENCE * 2, || {
            (recorded(&path).len() as u64 >= TASKS / 3).then_some(())
        })
        .await;
        let stopped = Instant::now();
        rabbitmqctl(&["stop_app"]).await;
        // The outage lasts as long as the scenario says, not until something happens.
        tokio::time::sleep(Duration::from_secs(3)).await;
        rabbitmqctl(&["start_app"]).await;
        let back = eventually_async_bool(broker_answers).await;
        println!("chaos restart: broker down for {:?}", stopped.elapsed());
        assert!(back);

        let delays = delays.await.unwrap();
        let _ = stop_calls.send(true);
        let calls = calls.await.unwrap();
        let confirmed: Vec<u64> = delays
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| *n)
            .collect();
        let failed: Vec<_> = delays
            .iter()
            .filter_map(|(_, r)| r.as_ref().err())
            .collect();
        for error in &failed {
            assert!(
                matches!(error, CallError::ConnectionLost(_) | CallError::Timeout),
                "a failed .delay() reports why: {error:?}"
            );
        }
        let counts = eventually("every confirmed task to run", PATIENCE * 4, || {
            let counts = recorded(&path);
            confirmed
                .iter()
                .all(|n| counts.contains_key(n))
                .then_some(counts)
        })
        .await;
        let runs: u32 = counts.values().sum();
        let duplicated = counts.values().filter(|c| **c > 1).count();
        let unconfirmed_but_run = delays
            .iter()
            .filter(|(n, r)| r.is_err() && counts.contains_key(n))
            .count();
        let calls_ok = calls.iter().filter(|(r, _)| r.is_ok()).count();
        let slowest = calls.iter().map(|(_, d)| *d).max().unwrap_or_default();
        println!(
            "chaos restart: sent {TASKS} delays, {} confirmed, {} failed with an error \
             ({unconfirmed_but_run} of those ran anyway); executed {} distinct in {runs} runs, \
             {duplicated} duplicated; calls: {} ok, {} failed, slowest {:?}",
            confirmed.len(),
            failed.len(),
            counts.len(),
            calls_ok,
            calls.len() - calls_ok,
            slowest
        );
        assert_eq!(confirmed.len() + failed.len(), TASKS as usize);
        assert!(
            slowest < Duration::from_secs(5),
            "no call hangs: slowest {slowest:?}"
        );
        assert!(
            calls.iter().any(|(r, _)| r.is_err()),
            "the outage was felt by calls"
        );
        // The same worker process resumed, and serves tasks sent after the restart.
        assert!(
            worker.output().matches("worker ready").count() >= 2,
            "{}",
            worker.output()
        );
        assert_eq!(add::new(2, 2).call(&client).await, Ok(4));
    })
    .await;
}

async fn eventually_async_bool<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    amqp_tasks_tests::harness::eventually_async(|| {
        let attempt = check();
        async move { attempt.await.then_some(true) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_messages_never_stop_the_worker() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new("chaos-malformed");
    bounded(Duration::from_secs(240), async {
        const MESSAGES: u64 = 12_000;
        let _worker = env.worker(WORKER, &["--tasks", "add", "--max-body-size", "4096"]).ready().await;
        let raw = env.raw().await;
        raw.channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let reply_to = raw.reply_queue().await;
        let mut replies = raw
            .channel
            .basic_consume(
                reply_to.as_str().into(),
                "chaos".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();

        // Five kinds of bad message for every good one, interleaved.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut confirms = Vec::new();
        for i in 0..MESSAGES {
            let kind = i % 6;
            let good = Codec::Bincode.encode(&(i as i64, 1i64)).unwrap();
            let (content_type, task, body): (&str, &str, Vec<u8>) = match kind {
                0 => ("application/x-bincode", "add", good),
                1 => {
                    let len = 32 + (random() % 32) as usize;
                    ("application/x-bincode", "add", (0..len).map(|_| random() as u8).collect())
                }
                2 => ("application/x-bincode", "add", good[..1].to_vec()),
                3 => ("text/plain", "add", b"1 + 1".to_vec()),
                4 => ("application/x-bincode", "no.such.task", good),
                _ => ("application/x-bincode", "add", vec![7; 5_000]),
            };
            let mut headers = FieldTable::default();
            headers.insert("task".into(), AMQPValue::LongString(task.into()));
            let properties = BasicProperties::default()
                .with_content_type(content_type.into())
                .with_reply_to(reply_to.as_str().into())
                .with_correlation_id(i.to_string().into())
                .with_headers(headers);
            let confirm = raw
                .channel
                .basic_publish("".into(), env.queue("add").as_str().into(), BasicPublishOptions::default(), &body, properties)
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack());
        }

        let expected_kind = |i: u64| match i % 6 {
            0 => "",
            1 | 2 => "bad_payload",
            3 => "unsupported_content_type",
            4 => "unknown_task",
            _ => "too_large",
        };
        let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
        let mut answered = 0;
        while answered < MESSAGES {
            let delivery = tokio::time::timeout(PATIENCE, amqp_tasks_next(&mut replies))
                .await
                .expect("replies keep coming")
                .expect("a reply");
            let i: u64 = delivery.properties.correlation_id().as_ref().unwrap().as_str().parse().unwrap();
            let status = delivery.properties.kind().as_ref().unwrap().as_str().to_owned();
            if i.is_multiple_of(6) {
                assert_eq!(status, "result");
                let sum: i64 = Codec::Bincode.decode(&delivery.data).unwrap();
                assert_eq!(sum, i as i64 + 1);
                *by_kind.entry("good".into()).or_default() += 1;
            } else {
                assert_eq!(status, "error", "message {i}");
                let codec = Codec::from_content_type(delivery.properties.content_type().as_ref().unwrap().as_str()).unwrap();
                let text = String::from_utf8_lossy(&delivery.data).into_owned();
                let kind = expected_kind(i);
                assert!(
                    codec == Codec::Bincode && text.contains(kind) || text.contains(&format!("\"kind\":\"{kind}\"")),
                    "message {i}: {text}"
                );
                *by_kind.entry(kind.into()).or_default() += 1;
            }
            answered += 1;
        }
        // Every message acked: the dead letters are all written, and they are exactly the bad ones.
        env.settled("add").await;
        let dead = env.depth("add.dlq").await;
        println!("chaos malformed: sent {MESSAGES}, answered {answered}: {by_kind:?}; dead-lettered {dead}");
        assert_eq!(by_kind["good"], 2_000);
        assert_eq!(dead, 10_000, "every bad message is dead-lettered, no good one");
        let client = env.client().await;
        assert_eq!(add::new(20, 22).call(&client).await, Ok(42), "the worker still serves");
    })
    .await;
}

async fn amqp_tasks_next(consumer: &mut lapin::Consumer) -> Option<lapin::message::Delivery> {
    use futures_core::Stream;
    let item = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *consumer).poll_next(cx)).await;
    item.map(|r| r.expect("reply consumer"))
}
