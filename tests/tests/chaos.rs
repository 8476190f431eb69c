//! Chaos: failures caused for real, with every task counted. They load the machine, so they run
//! one at a time, in this test target of their own; the one that restarts RabbitMQ restarts a
//! private node of its own (`amqp_tasks_tests::node`), never the shared broker.
//!
//! Run with `cargo test -p amqp-tasks-tests --test chaos -- --nocapture` to see the figures.

use amqp_tasks::{CallError, Client, Codec};
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, bounded, eventually, eventually_async};
use amqp_tasks_tests::node::{Node, NodeConfig};
use amqp_tasks_tests::tasks::*;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
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

/// The reply queues of a namespace on a node (one per client connection).
async fn reply_queues(node: &Node, namespace: &str) -> BTreeSet<String> {
    let prefix = format!("{namespace}.amqp-tasks.reply.");
    node.rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name"])
        .await
        .lines()
        .map(str::trim)
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// When something happened, relative to the start of the test.
fn at(origin: Instant) -> Duration {
    origin.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_confirmed_task_and_hangs_no_call() {
    let _serial = SERIAL.lock().await;
    // A broker of this test's own: restarting it cannot disturb any other test.
    let node = Arc::new(Node::start(NodeConfig::plain()).await);
    let env = TestEnv::on_node("chaos-restart", node.clone());
    bounded(Duration::from_secs(240), async {
        let origin = Instant::now();
        let worker = env.worker(WORKER, &["--tasks", "record,add,sleep_ms"]).ready().await;
        let client = Client::builder(env.url.clone())
            .namespace(env.namespace.clone())
            .confirm_timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap();
        let path = env.path("records");
        // Both reply queues (the test's client and the worker's own): gone with their
        // connections, replaced by fresh ones.
        let replies_before = eventually_async(|| async {
            let queues = reply_queues(&node, &env.namespace).await;
            (queues.len() == 2).then_some(queues)
        })
        .await;

        // A call in flight when the broker goes: it must fail at once, with ConnectionLost.
        let in_flight = tokio::spawn({
            let client = client.clone();
            async move {
                let result = sleep_ms::new(15_000)
                    .timeout(Duration::from_secs(30))
                    .call(&client)
                    .await;
                (result, at(origin))
            }
        });
        worker.wait_for("task started").await;

        // A stream of .delay()s, about 20 in flight at any moment, and a stream of .call()s, each
        // outcome timed. Twenty senders each send their next delay as soon as their last one
        // returned: batches of twenty left a gap between batches, in which the outage could begin
        // with no delay in flight (it did once, on a loaded machine).
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let delays = tokio::spawn({
            let (client, path, stopped) = (client.clone(), path.clone(), stopped.clone());
            async move {
                let senders = (0..20u64).map(|sender| {
                    let (client, path, stopped) = (client.clone(), path.clone(), stopped.clone());
                    async move {
                        let mut outcomes = Vec::new();
                        let mut n = sender;
                        while !*stopped.borrow() {
                            let started = at(origin);
                            let result = record::new(path.clone(), n).delay(&client).await;
                            outcomes.push((n, started, at(origin), result));
                            n += 20;
                        }
                        outcomes
                    }
                });
                futures_join(senders)
                    .await
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
            }
        });
        let calls = tokio::spawn({
            let client = client.clone();
            async move {
                let mut outcomes = Vec::new();
                while !*stopped.borrow() {
                    let started = at(origin);
                    let result = add::new(1, 2)
                        .timeout(Duration::from_secs(20))
                        .call(&client)
                        .await;
                    outcomes.push((started, at(origin), result));
                }
                outcomes
            }
        });

        // The outage starts in the middle of the streams.
        eventually("500 tasks recorded before the outage", PATIENCE * 2, || {
            (recorded(&path).len() >= 500).then_some(())
        })
        .await;
        let down = at(origin);
        node.stop_app().await;
        // `stop_app` returns once the broker has closed its connections (how long that takes
        // depends on the machine's load, not on the client): the call in flight must have
        // failed by then, or within moments of it, and not at its own 20 s deadline.
        let stopped = at(origin);
        let (lost, lost_at) = in_flight.await.unwrap();
        assert!(matches!(lost, Err(CallError::ConnectionLost(_))), "{lost:?}");
        assert!(
            lost_at.saturating_sub(stopped) < Duration::from_secs(2),
            "the call in flight failed {:?} after the broker had stopped ({:?} after stop_app \
             was asked)",
            lost_at.saturating_sub(stopped),
            lost_at - down
        );
        // New calls and delays, made now that the broker is known to be down, wait for it.
        let made_while_down = tokio::spawn({
            let (client, path) = (client.clone(), path.clone());
            async move {
                let started = at(origin);
                let call = add::new(20, 22).timeout(Duration::from_secs(20)).call(&client);
                let delay = record::new(path, 1_000_000).delay(&client);
                let (called, delayed) = tokio::join!(call, delay);
                (started, called, delayed, at(origin))
            }
        });
        // The outage lasts as long as the scenario says, not until something happens.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let up_asked = at(origin);
        node.start_app().await;
        let up = at(origin);
        println!("chaos restart: broker down from {down:?} to {up:?} (start_app asked at {up_asked:?})");

        // Both streams go on after the broker is back, then stop.
        let before_stop = recorded(&path).len();
        eventually("200 more tasks recorded after the restart", PATIENCE * 2, || {
            (recorded(&path).len() >= before_stop + 200).then_some(())
        })
        .await;
        let _ = stop.send(true);
        let delays = delays.await.unwrap();
        let calls = calls.await.unwrap();

        // Delays: every one that returned Ok ran; the ones that failed say why, and only those
        // in flight as the connection dropped failed.
        let confirmed: Vec<u64> = delays.iter().filter(|d| d.3.is_ok()).map(|d| d.0).collect();
        let failed: Vec<_> = delays.iter().filter(|d| d.3.is_err()).collect();
        for (n, started, ended, result) in &failed {
            assert!(
                matches!(result, Err(CallError::ConnectionLost(_) | CallError::Timeout)),
                "delay {n} ({started:?}..{ended:?}) failed without saying why: {result:?}"
            );
            assert!(
                *started <= lost_at && *ended >= down,
                "delay {n} failed although it was not in flight as the broker went ({started:?}..{ended:?})"
            );
        }
        assert!(failed.len() <= 20, "{} delays failed", failed.len());
        assert!(
            delays.iter().any(|d| d.1 < down && d.2 > down),
            "the outage began while delays were in flight"
        );
        let (started, called, delayed, ended) = made_while_down.await.unwrap();
        assert!(started >= lost_at && started < up_asked, "made while down: {started:?}");
        assert_eq!(called, Ok(42), "a call made while the broker was down waits for it");
        assert!(delayed.is_ok(), "a delay made while the broker was down waits for it: {delayed:?}");
        assert!(ended >= up_asked, "they completed once the broker was back ({ended:?})");
        let waited: Vec<_> = delays.iter().filter(|d| d.1 > lost_at && d.1 < up_asked).collect();
        for (n, started, ended, result) in &waited {
            assert!(
                result.is_ok() && *ended >= up_asked,
                "delay {n} made while the broker was down ({started:?}..{ended:?}) must wait for it and succeed: {result:?}"
            );
        }
        // Calls: none hangs; those made while the broker was down wait for it and succeed.
        let slowest = calls.iter().map(|(s, e, _)| *e - *s).max().unwrap_or_default();
        assert!(slowest < Duration::from_secs(21), "a call took {slowest:?}");
        let waiting_calls: Vec<_> = calls.iter().filter(|c| c.0 > lost_at && c.0 < up_asked).collect();
        for (started, ended, result) in &waiting_calls {
            assert_eq!(*result, Ok(3), "a call made while the broker was down ({started:?}..{ended:?})");
        }
        for (started, ended, result) in &calls {
            if let Err(error) = result {
                assert!(
                    matches!(error, CallError::ConnectionLost(_)) && *started <= lost_at && *ended >= down,
                    "a call failed outside the outage or without saying why ({started:?}..{ended:?}): {error:?}"
                );
            }
        }

        let counts = eventually("every confirmed task to run", PATIENCE * 4, || {
            let counts = recorded(&path);
            (confirmed.iter().all(|n| counts.contains_key(n)) && counts.contains_key(&1_000_000))
                .then_some(counts)
        })
        .await;
        let runs: u32 = counts.values().sum();
        let duplicated = counts.values().filter(|c| **c > 1).count();
        let unconfirmed_but_run = failed.iter().filter(|d| counts.contains_key(&d.0)).count();
        let calls_ok = calls.iter().filter(|c| c.2.is_ok()).count();
        println!(
            "chaos restart: sent {} delays, {} confirmed, {} failed with an error \
             ({unconfirmed_but_run} of those ran anyway); executed {} distinct in {runs} runs, \
             {duplicated} duplicated; calls: {calls_ok} ok, {} failed, slowest {slowest:?}",
            delays.len(),
            confirmed.len(),
            failed.len(),
            counts.len(),
            calls.len() - calls_ok,
        );

        // The same worker process resumed, and both sides got fresh reply queues.
        assert!(
            worker.output().matches("worker ready").count() >= 2,
            "{}",
            worker.output()
        );
        assert_eq!(add::new(2, 2).call(&client).await, Ok(4));
        let replies_after = reply_queues(&node, &env.namespace).await;
        assert_eq!(replies_after.len(), 2, "{replies_after:?}");
        assert!(
            replies_after.is_disjoint(&replies_before),
            "fresh reply queues: {replies_before:?} then {replies_after:?}"
        );
    })
    .await;
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
