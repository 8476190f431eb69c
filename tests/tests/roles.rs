//! Producer, worker and relay as separate processes: the test process produces, `test-worker`
//! processes serve.

use amqp_tasks::{CallError, Client, Worker, task};
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, bounded, concurrently};
use amqp_tasks_tests::tasks::*;
use lapin::types::AMQPValue;
use std::time::Duration;
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_call_through_a_worker() {
    let env = TestEnv::new("delay-call");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &[]).ready().await;
        let client = env.client().await;

        assert_eq!(add::new(20, 22).call(&client).await, Ok(42));

        let marker = env.path("delayed");
        let id = touch::new(marker.clone(), 0)
            .delay(&client)
            .await
            .expect("delay");
        assert!(!id.as_str().is_empty());
        let done = format!("{marker}.done");
        amqp_tasks_tests::harness::eventually("the delayed task to run", PATIENCE, || {
            std::fs::metadata(&done).ok()
        })
        .await;

        // Concurrent calls on one client are answered independently.
        let sums = concurrently(&client, 50, |client, i| async move {
            add::new(i as i64, i as i64).call(&client).await
        })
        .await;
        for (i, sum) in sums.into_iter().enumerate() {
            assert_eq!(sum, Ok(2 * i as i64));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_task_error_arrives_intact() {
    let env = TestEnv::new("typed-error");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "math.div"]).ready().await;
        let client = env.client().await;
        assert_eq!(div::new(7, 2).call(&client).await, Ok(3));
        assert_eq!(
            div::new(1, 0).call(&client).await,
            Err(CallError::Task(DivError::ByZero))
        );
        assert_eq!(
            div::new(i64::MIN, -1).call(&client).await,
            Err(CallError::Task(DivError::Overflow { a: i64::MIN, b: -1 }))
        );
        // A task error is an answer, not a dead letter: once every call is acked (a dead letter
        // would have been confirmed before the ack), the dead-letter queue is still empty.
        env.settled("math.div").await;
        assert_eq!(env.depth("math.div.dlq").await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_timeout_is_reported_promptly() {
    let env = TestEnv::new("timeout");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "sleep_ms"]).ready().await;
        let client = env.client().await;
        let started = Instant::now();
        let result = sleep_ms::new(5_000)
            .timeout(Duration::from_millis(300))
            .call(&client)
            .await;
        assert_eq!(result, Err(CallError::Timeout));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_calls_another_worker_process() {
    let env = TestEnv::new("relay");
    bounded(LIMIT, async {
        let _relay = env
            .worker(WORKER, &["--tasks", "relay_div,relay_trace"])
            .ready()
            .await;
        let downstream = env
            .worker(WORKER, &["--tasks", "math.div,context_info"])
            .ready()
            .await;
        let client = env.client().await;

        assert_eq!(relay_div::new(9, 3).call(&client).await, Ok(3));
        // The downstream task's typed error, mapped by the relay into its own.
        assert_eq!(
            relay_div::new(1, 0).call(&client).await,
            Err(CallError::Task(RelayError::Div(DivError::ByZero)))
        );

        // One trace id through every hop, in the logs of every process.
        let (relay_trace, downstream_trace, downstream_parent, relay_id) =
            relay_trace::new().call(&client).await.expect("relay_trace");
        assert_eq!(relay_trace, downstream_trace);
        assert_eq!(downstream_parent.as_deref(), Some(relay_id.as_str()));
        downstream.wait_for(&downstream_trace).await;
        _relay.wait_for(&relay_trace).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_propagates_the_deadline() {
    let env = TestEnv::new("deadline");
    bounded(LIMIT, async {
        let relay = env
            .worker(WORKER, &["--tasks", "relay_remaining,relay_slow"])
            .ready()
            .await;
        let _downstream = env
            .worker(WORKER, &["--tasks", "remaining_ms,sleep_ms"])
            .ready()
            .await;
        let client = env.client().await;

        // The downstream call inherits what is left of the caller's 2 s, minus the relay's 300 ms.
        let remaining = relay_remaining::new(300)
            .timeout(Duration::from_secs(2))
            .call(&client)
            .await
            .expect("relay_remaining")
            .expect("a deadline downstream");
        assert!(
            remaining <= 1_700 && remaining > 500,
            "downstream had {remaining} ms left"
        );

        // A relay whose caller gives up after 800 ms does not wait longer downstream.
        let started = Instant::now();
        let result = relay_slow::new(10_000)
            .timeout(Duration::from_millis(800))
            .call(&client)
            .await;
        assert_eq!(result, Err(CallError::Timeout));
        assert!(started.elapsed() < Duration::from_secs(3));
        relay.wait_for("no answer before the deadline").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_calling_its_own_process_does_not_deadlock() {
    let env = TestEnv::new("no-deadlock");
    bounded(LIMIT, async {
        // One slot: the relay must lend it while it waits for `add`, served by the same process.
        let _worker = env
            .worker(WORKER, &["--tasks", "relay_sum,add", "--concurrency", "1"])
            .ready()
            .await;
        let client = env.client().await;
        let sums = concurrently(&client, 4, |client, _| async move {
            relay_sum::new(5)
                .timeout(Duration::from_secs(20))
                .call(&client)
                .await
        })
        .await;
        assert!(sums.iter().all(|sum| *sum == Ok(10)), "{sums:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded_across_queues() {
    let env = TestEnv::new("concurrency");
    bounded(LIMIT, async {
        let _worker = env
            .worker(
                WORKER,
                &["--tasks", "probe_a,probe_b", "--concurrency", "3"],
            )
            .ready()
            .await;
        let client = env.client().await;
        let probes = concurrently(&client, 24, |client, i| async move {
            if i % 2 == 0 {
                probe_a::new(100).call(&client).await
            } else {
                probe_b::new(100).call(&client).await
            }
        })
        .await;
        let most = probes.into_iter().map(|p| p.expect("probe")).max().unwrap();
        assert_eq!(
            most, 3,
            "at most 3 tasks ran at once in the process, and 3 did"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_workers_share_a_queue() {
    let env = TestEnv::new("competing");
    bounded(LIMIT, async {
        let first = env
            .worker(WORKER, &["--tasks", "whoami", "--concurrency", "2"])
            .ready()
            .await;
        let second = env
            .worker(WORKER, &["--tasks", "whoami", "--concurrency", "2"])
            .ready()
            .await;
        let client = env.client().await;
        let pids: std::collections::BTreeSet<u32> =
            concurrently(&client, 16, |client, _| async move {
                whoami::new(100).call(&client).await
            })
            .await
            .into_iter()
            .map(|pid| pid.expect("whoami"))
            .collect();
        assert_eq!(pids, [first.pid(), second.pid()].into_iter().collect());
    })
    .await;
}

#[task(name = "nobody.serves.this")]
async fn orphan(x: u8) -> u8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_without_a_queue_is_no_route() {
    let env = TestEnv::new("no-route");
    bounded(LIMIT, async {
        let client = env.client().await;
        let queue = env.queue("nobody.serves.this");
        assert_eq!(
            orphan::new(1).delay(&client).await,
            Err(CallError::NoRoute {
                queue: queue.clone()
            })
        );
        assert_eq!(
            orphan::new(1).call(&client).await,
            Err(CallError::NoRoute { queue })
        );
        // The client still works afterwards.
        assert_eq!(
            orphan::new(1).delay(&client).await.unwrap_err().kind(),
            "no_route"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_waits_in_its_queue_for_a_worker() {
    let env = TestEnv::new("waits");
    bounded(LIMIT, async {
        // A worker declares the queue, then goes away.
        let mut first = env.worker(WORKER, &["--tasks", "touch"]).ready().await;
        first.signal("TERM");
        assert!(first.exit(PATIENCE).await.success());

        let client = env.client().await;
        let marker = env.path("waiting");
        let id = touch::new(marker.clone(), 0)
            .delay(&client)
            .await
            .expect("delay");
        assert_eq!(env.depth("touch").await, 1);

        // What is on the wire: persistent, typed, with the documented headers.
        let raw = env.raw().await;
        let message = raw.get(&env.queue("touch"), PATIENCE).await;
        let properties = &message.properties;
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.message_id().as_ref().map(|m| m.as_str()),
            Some(id.as_str())
        );
        assert_eq!(properties.kind().as_ref().map(|m| m.as_str()), Some("call"));
        assert_eq!(
            properties.content_type().as_ref().map(|m| m.as_str()),
            Some("application/x-bincode")
        );
        assert!(properties.expiration().is_none());
        let headers = properties.headers().as_ref().expect("headers").inner();
        assert_eq!(
            headers.get("task"),
            Some(&AMQPValue::LongString("touch".into()))
        );
        assert!(headers.contains_key("signature"), "{headers:?}");
        // Defaults are left out: wire version 1, a first attempt of a root task, no trace to
        // continue.
        for key in [
            "wire",
            "attempt",
            "root_id",
            "parent_id",
            "traceparent",
            "deadline",
        ] {
            assert!(!headers.contains_key(key), "header `{key}` in {headers:?}");
        }

        // Put it back (as sent) and let a worker come.
        let _ = raw
            .channel
            .basic_publish(
                "".into(),
                env.queue("touch").as_str().into(),
                Default::default(),
                &message.data,
                message.properties.clone(),
            )
            .await
            .unwrap()
            .await;
        let _second = env.worker(WORKER, &["--tasks", "touch"]).ready().await;
        let done = format!("{marker}.done");
        amqp_tasks_tests::harness::eventually("the waiting task to run", PATIENCE, || {
            std::fs::metadata(&done).ok()
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_transient_and_expires_with_its_deadline() {
    let env = TestEnv::new("call-props");
    bounded(LIMIT, async {
        let mut worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        worker.signal("TERM");
        worker.exit(PATIENCE).await;
        let client = env.client().await;
        let call = tokio::spawn({
            let client = client.clone();
            async move {
                add::new(1, 1)
                    .timeout(Duration::from_secs(5))
                    .call(&client)
                    .await
            }
        });
        let raw = env.raw().await;
        let message = raw.get(&env.queue("add"), PATIENCE).await;
        let properties = &message.properties;
        assert_eq!(properties.delivery_mode(), &Some(1));
        let expiration: u64 = properties
            .expiration()
            .as_ref()
            .expect("expiration")
            .as_str()
            .parse()
            .unwrap();
        assert!(expiration <= 5_000 && expiration > 3_000, "{expiration}");
        assert!(
            properties
                .reply_to()
                .as_ref()
                .unwrap()
                .as_str()
                .contains("amqp-tasks.reply.")
        );
        assert!(properties.correlation_id().is_some());
        let headers = properties.headers().as_ref().unwrap().inner();
        assert!(matches!(
            headers.get("deadline"),
            Some(AMQPValue::LongLongInt(_))
        ));
        // Nobody answers: the caller times out rather than waiting forever.
        assert_eq!(call.await.unwrap(), Err(CallError::Timeout));

        // And the broker drops a call nobody took before its deadline: it is not left in the
        // queue for a worker to find later.
        let expiring = tokio::spawn({
            let client = client.clone();
            async move {
                add::new(2, 2)
                    .timeout(Duration::from_millis(800))
                    .call(&client)
                    .await
            }
        });
        amqp_tasks_tests::harness::eventually_async(|| async {
            (env.depth("add").await == 1).then_some(())
        })
        .await;
        assert_eq!(expiring.await.unwrap(), Err(CallError::Timeout));
        amqp_tasks_tests::harness::eventually_async(|| async {
            (env.depth("add").await == 0).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_worker_runs_next_to_other_work() {
    let env = TestEnv::new("embedded");
    bounded(LIMIT, async {
        let client = env.client().await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(
            Worker::builder(client.clone())
                .tasks(["add", "context_info"])
                .concurrency(8)
                .serve(async move {
                    let _ = stopped.await;
                }),
        );
        // Other work of the same application keeps running meanwhile.
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                let mut interval = tokio::time::interval(Duration::from_millis(5));
                loop {
                    interval.tick().await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        // The same client produces and serves.
        let sum = amqp_tasks_tests::harness::eventually_async(|| async {
            add::new(2, 3).call(&client).await.ok()
        })
        .await;
        assert_eq!(sum, 5);
        let (_, root, parent, attempt, redelivered) =
            context_info::new().call(&client).await.unwrap();
        assert!(!root.is_empty());
        assert_eq!((parent, attempt, redelivered), (None, 1, false));
        // Calls keep being served while the ticker keeps ticking: both make progress.
        let at_start = ticks.load(std::sync::atomic::Ordering::SeqCst);
        let mut served = 0;
        let deadline = Instant::now() + PATIENCE;
        while ticks.load(std::sync::atomic::Ordering::SeqCst) < at_start + 10 {
            assert!(
                Instant::now() < deadline,
                "the ticker stalled while the worker served"
            );
            assert_eq!(add::new(served, 1).call(&client).await, Ok(served + 1));
            served += 1;
        }
        assert!(served > 0);
        ticker.abort();
        stop.send(()).unwrap();
        worker
            .await
            .unwrap()
            .expect("the embedded worker drains and returns Ok");
        let _: &Client = &client;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_delays_is_confirmed_message_by_message() {
    let env = TestEnv::new("batch");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "record"]).ready().await;
        let client = env.client().await;
        let path = env.path("batch");
        let sent = client
            .delay_all((0..500).map(|n| record::new(path.clone(), n)))
            .await;
        assert_eq!(sent.len(), 500);
        assert!(
            sent.iter().all(Result::is_ok),
            "{:?}",
            sent.iter().find(|r| r.is_err())
        );
        let ids: std::collections::BTreeSet<_> = sent.into_iter().map(Result::unwrap).collect();
        assert_eq!(ids.len(), 500, "one task id each");
        amqp_tasks_tests::harness::eventually("the batch to run", PATIENCE, || {
            let lines = std::fs::read_to_string(&path).unwrap_or_default();
            (lines.lines().count() >= 500).then_some(())
        })
        .await;
        // Each message is confirmed on its own: a batch to nowhere fails message by message.
        let lost = client.delay_all((0..3).map(orphan::new)).await;
        assert!(
            lost.iter()
                .all(|r| matches!(r, Err(CallError::NoRoute { .. }))),
            "{lost:?}"
        );
    })
    .await;
}

/// The worker coalesces acks (a `multiple` ack per run of finished deliveries), but never holds
/// one back for company that does not come: a lone task, and the tail of a burst smaller than
/// the batch, are acked all the same, and nothing is left unacknowledged on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_acks_leave_no_delivery_unacked() {
    let env = TestEnv::new("ack-tail");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &[]).ready().await;
        let client = env.client().await;

        assert_eq!(add::new(1, 2).call(&client).await, Ok(3));
        env.settled("add").await;

        // 40 at once: more than one batch (half the prefetch of 64), and a tail that is not.
        let sums = concurrently(&client, 40, |client, i| async move {
            add::new(i as i64, 1).call(&client).await
        })
        .await;
        for (i, sum) in sums.into_iter().enumerate() {
            assert_eq!(sum, Ok(i as i64 + 1));
        }
        env.settled("add").await;
    })
    .await;
}
