//! Hostile input: no message, header or number stalls, loops or blinds a worker. Each test
//! publishes hand-made messages with lapin (no stub) to a worker process, and after each case
//! checks that it was answered or dead-lettered with a reason, that the worker's broker session
//! did not drop, and that a normal call right after is answered within a second.

use amqp_tasks::{CallError, Client, Codec, DynamicCall};
use amqp_tasks_tests::harness::{
    PATIENCE, Raw, TestEnv, WorkerProcess, amqp_url, bounded, close_connections, eventually,
    rabbitmqctl, run_blocking,
};
use amqp_tasks_tests::tasks::*;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(120);

struct Answer {
    kind: String,
    raw: Vec<u8>,
    json: Value,
}

impl Answer {
    /// The `kind` of an error reply, in either codec.
    fn error_kind(&self) -> String {
        assert_eq!(self.kind, "error", "an error reply");
        if let Some(kind) = self.json["error"]["kind"].as_str() {
            return kind.to_owned();
        }
        #[derive(serde::Deserialize)]
        struct Reply {
            error: Body,
        }
        #[derive(serde::Deserialize)]
        struct Body {
            kind: String,
            #[allow(dead_code)]
            r#type: String,
            #[allow(dead_code)]
            message: String,
            #[allow(dead_code)]
            args: Vec<String>,
            #[allow(dead_code)]
            value: Option<()>,
        }
        Codec::Bincode
            .decode::<Reply>(&self.raw)
            .map(|reply| reply.error.kind)
            .unwrap_or_else(|e| panic!("an error reply: {e}"))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn headers(task: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert("task".into(), AMQPValue::LongString(task.into()));
    headers
}

fn bincode() -> Option<&'static str> {
    Some("application/x-bincode")
}

/// Publishes a hand-made message with a reply queue of its own and returns the reply.
async fn send(
    raw: &Raw,
    queue: &str,
    content_type: Option<&str>,
    headers: FieldTable,
    body: &[u8],
) -> Answer {
    let reply_to = raw.reply_queue().await;
    let mut properties = BasicProperties::default()
        .with_reply_to(reply_to.as_str().into())
        .with_correlation_id("hostile".into())
        .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
        .with_headers(headers);
    if let Some(content_type) = content_type {
        properties = properties.with_content_type(content_type.into());
    }
    publish(raw, queue, properties, body).await;
    let reply = raw.get(&reply_to, PATIENCE).await;
    let json = serde_json::from_slice(&reply.data).unwrap_or(Value::Null);
    Answer {
        kind: reply
            .properties
            .kind()
            .as_ref()
            .map(|k| k.as_str().to_owned())
            .unwrap_or_default(),
        raw: reply.data,
        json,
    }
}

async fn publish(raw: &Raw, queue: &str, properties: BasicProperties, body: &[u8]) {
    raw.channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

/// The dead letter at the head of `<queue>.dlq`: its `dead_reason` and `dead_error`, and its
/// header table.
async fn dead_letter(env: &TestEnv, raw: &Raw, queue: &str) -> (String, String, FieldTable) {
    let message = raw
        .get(&format!("{}.dlq", env.queue(queue)), PATIENCE)
        .await;
    let headers = message.properties.headers().clone().unwrap_or_default();
    let text = |key: &str| match headers.inner().get(key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("dead letter header `{key}`: {other:?}"),
    };
    (text("dead_reason"), text("dead_error"), headers)
}

/// The worker still has its first broker session, and answers a normal call within a second.
async fn still_serving(worker: &WorkerProcess, client: &Client) {
    let started = Instant::now();
    assert_eq!(
        add::new(20, 22)
            .timeout(Duration::from_secs(1))
            .call(client)
            .await,
        Ok(42),
        "a normal call right after"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let output = worker.output();
    assert_eq!(
        output.matches("worker ready").count(),
        1,
        "the session survived:\n{output}"
    );
    assert!(!output.contains("consumers stopped"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_extreme_numbers_are_clamped_not_fatal() {
    let env = TestEnv::new("hostile-numbers");
    bounded(LIMIT, async {
        let worker = env
            .worker(WORKER, &["--tasks", "add,patient"])
            .ready()
            .await;
        let client = env.client().await;
        let raw = env.raw().await;
        let body = Codec::Bincode.encode(&(1i64, 2i64)).unwrap();

        // A deadline 300 years ahead on a task due in 1.5 s: sent on through the delay queues
        // with an expiration the broker accepts, then run.
        let mut forged = headers("add");
        forged.insert(
            "deadline".into(),
            AMQPValue::LongLongInt(10_000_000_000_000),
        );
        forged.insert("eta".into(), AMQPValue::LongLongInt(now_ms() + 1_500));
        let answer = send(&raw, &env.queue("add"), bincode(), forged, &body).await;
        assert_eq!(answer.kind, "result");
        assert_eq!(Codec::Bincode.decode::<i64>(&answer.raw), Ok(3));
        still_serving(&worker, &client).await;

        // Counts from the wire at the end of their range.
        let mut forged = headers("add");
        forged.insert("attempt".into(), AMQPValue::LongLongInt(i64::MAX));
        forged.insert("redeliveries".into(), AMQPValue::LongLongInt(4_294_967_295));
        forged.insert("x-delivery-count".into(), AMQPValue::LongLongInt(-1));
        let answer = send(&raw, &env.queue("add"), bincode(), forged, &body).await;
        assert_eq!(answer.kind, "result");
        still_serving(&worker, &client).await;

        // What callers ask for: no panic, no broker error.
        let forever = DynamicCall::new("add", json!({"a": 1, "b": 2}))
            .timeout(Duration::MAX)
            .call(&client)
            .await;
        assert_eq!(forever, Ok(json!(3)));
        assert_eq!(
            patient::new().call(&client).await,
            Ok(7),
            "23 retries of 1 h"
        );
        let never = add::new(1, 1).countdown(Duration::MAX).delay(&client).await;
        assert!(never.is_ok(), "{never:?}");
        let long_id = add::new(1, 1).task_id("x".repeat(300)).delay(&client).await;
        assert!(
            matches!(&long_id, Err(CallError::Rejected(m)) if m.contains("255")),
            "{long_id:?}"
        );
        still_serving(&worker, &client).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_names_are_answered_and_dead_lettered() {
    let env = TestEnv::new("hostile-headers");
    bounded(LIMIT, async {
        let worker = env.worker(WORKER, &["--tasks", "add,greet"]).ready().await;
        let client = env.client().await;
        let raw = env.raw().await;
        let body = Codec::Bincode.encode(&(1i64, 2i64)).unwrap();

        // A 40 KB header of any name: larger than the frames lapin asked for before, within
        // what the broker accepts. Run as usual.
        let mut big = headers("add");
        big.insert(
            "x-ballast".into(),
            AMQPValue::LongString("b".repeat(40_000).into()),
        );
        let answer = send(&raw, &env.queue("add"), bincode(), big, &body).await;
        assert_eq!(answer.kind, "result");
        still_serving(&worker, &client).await;

        // A 40 KB task name: unknown, answered and dead-lettered; the dead letter's error is cut.
        let name = "t".repeat(40_000);
        let answer = send(&raw, &env.queue("add"), bincode(), headers(&name), &body).await;
        assert_eq!(answer.error_kind(), "unknown_task");
        let (reason, error, _) = dead_letter(&env, &raw, "add").await;
        assert_eq!(reason, "unknown_task");
        assert!(error.len() <= 2_048, "dead_error of {} bytes", error.len());
        still_serving(&worker, &client).await;

        // Headers too large to be copied with the framework's own within a frame: refused as
        // too large; the dead letter keeps what fits and names what it dropped.
        let mut huge = headers("add");
        for i in 0..4 {
            huge.insert(
                format!("x-ballast-{i}").as_str().into(),
                AMQPValue::LongString("h".repeat(28_000).into()),
            );
        }
        let answer = send(&raw, &env.queue("add"), bincode(), huge, &body).await;
        assert_eq!(answer.error_kind(), "too_large");
        let (reason, error, _) = dead_letter(&env, &raw, "add").await;
        assert_eq!(reason, "too_large");
        assert!(error.contains("headers"), "{error}");
        still_serving(&worker, &client).await;

        // A JSON body with an unknown key of 40 KB: the error that quotes it is cut too.
        let key = "k".repeat(40_000);
        let json_body = serde_json::to_vec(&json!({"name": "a", "times": 1, key: 1})).unwrap();
        let answer = send(
            &raw,
            &env.queue("greet"),
            Some("application/json"),
            headers("greet"),
            &json_body,
        )
        .await;
        assert_eq!(answer.error_kind(), "bad_payload");
        let (reason, error, _) = dead_letter(&env, &raw, "greet").await;
        assert_eq!(reason, "bad_payload");
        assert!(error.len() <= 2_048, "dead_error of {} bytes", error.len());

        // A task header that is not a string is bad input, not an absent name.
        let mut typed = FieldTable::default();
        typed.insert("task".into(), AMQPValue::LongInt(7));
        let answer = send(&raw, &env.queue("add"), bincode(), typed, &body).await;
        assert_eq!(answer.error_kind(), "bad_payload");
        assert_eq!(dead_letter(&env, &raw, "add").await.0, "bad_payload");
        still_serving(&worker, &client).await;
        env.settled("add").await;
        env.settled("greet").await;
        assert_eq!(env.depth("add.dlq").await, 0);
        assert_eq!(env.depth("greet.dlq").await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_ends_in_a_new_one_and_sigterm_is_obeyed_meanwhile() {
    let env = TestEnv::new("hostile-frames");
    bounded(LIMIT, async {
        // A worker that gave up the header promise (frames smaller than the broker's), sent a
        // message whose headers do not fit them: lapin fails its whole connection.
        let url = format!("{}?frame_max=8192", amqp_url());
        let mut worker = WorkerProcess::spawn(
            WORKER,
            &["--tasks", "add"],
            &[("AMQP_URL", &url), ("AMQP_TASKS_NAMESPACE", &env.namespace)],
        )
        .ready()
        .await;
        let raw = env.raw().await;
        let mut big = headers("add");
        big.insert(
            "x-ballast".into(),
            AMQPValue::LongString("b".repeat(40_000).into()),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/x-bincode".into())
            .with_headers(big);
        let body = Codec::Bincode.encode(&(1i64, 2i64)).unwrap();
        publish(&raw, &env.queue("add"), properties, &body).await;
        // It does not sit idle: it notices, and opens new sessions (with a backoff: the message
        // is still there, and still too large for them).
        eventually("new sessions", PATIENCE, || {
            (worker
                .output()
                .matches("amqp_tasks::transport: connected")
                .count()
                >= 3)
                .then_some(())
        })
        .await;
        // And SIGTERM is obeyed in whatever state it is in.
        let asked = Instant::now();
        worker.signal("TERM");
        let status = worker.exit(PATIENCE).await;
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "exited {:?} after SIGTERM",
            asked.elapsed()
        );
        assert!(matches!(status.code(), Some(0 | 3)), "{status:?}");
        // Nothing was lost: the message is still in its queue (or its redelivered lane).
        let left = env.depth("add").await + env.depth("add.redelivered").await;
        assert_eq!(left, 1);
    })
    .await;
}

/// Restarts a worker (as its supervisor would) until `done`; returns the number of crashes, and
/// the worker still running.
async fn restart_until(
    env: &TestEnv,
    args: &[&str],
    mut done: impl FnMut() -> bool,
    mut check: impl AsyncFnMut() -> bool,
) -> (usize, WorkerProcess) {
    let mut crashes = 0;
    let deadline = Instant::now() + LIMIT;
    let mut worker = env.worker(WORKER, args).ready().await;
    loop {
        assert!(
            Instant::now() < deadline,
            "neither done nor crashed in time"
        );
        if worker.has_exited() {
            let status = worker.exit(PATIENCE).await;
            assert!(!status.success(), "only the poison stops the worker");
            crashes += 1;
            assert!(crashes <= 20, "crash loop");
            worker = env.worker(WORKER, args).ready().await;
        } else if done() && check().await {
            return (crashes, worker);
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_among_innocents_is_the_only_dead_letter() {
    for queue_type in ["classic", "quorum"] {
        let env = TestEnv::new(&format!("hostile-poison-{queue_type}"));
        bounded(LIMIT, async {
            let args = [
                "--tasks",
                "mixed_poison,mixed_innocent",
                "--concurrency",
                "8",
                "--prefetch",
                "64",
                "--max-redeliveries",
                "2",
                "--queue-type",
                queue_type,
            ];
            // The queue must exist before the tasks are sent: a worker declares it, then goes.
            let mut first = env.worker(WORKER, &args).ready().await;
            first.signal("TERM");
            assert!(first.exit(PATIENCE).await.success());
            let client = env.client().await;
            let path = env.path("mixed");
            for n in 0..64 {
                if n == 20 {
                    mixed_poison::new(path.clone()).delay(&client).await.unwrap();
                } else {
                    let n = if n < 20 { n } else { n - 1 };
                    mixed_innocent::new(path.clone(), n, 50)
                        .delay(&client)
                        .await
                        .unwrap();
                }
            }
            let innocents_ran = || {
                let ran: std::collections::BTreeSet<u64> =
                    lines(&path).iter().filter_map(|l| l.parse().ok()).collect();
                ran.len() == 63
            };
            let (crashes, mut worker) = restart_until(&env, &args, innocents_ran, async || {
                env.depth("mixed.dlq").await == 1
            })
            .await;
            let (reason, error, _) = dead_letter(&env, &env.raw().await, "mixed").await;
            assert_eq!(reason, "too_many_redeliveries", "{error}");
            let poison_runs = lines(&path).iter().filter(|l| l.starts_with("poison")).count();
            println!("{queue_type}: the poison ran {poison_runs} times, {crashes} crashes; 63 innocents ran");
            // Once among the others, then alone until the limit: never an innocent blamed. (An
            // innocent may run twice: at least once is the promise, and a worker killed while it
            // moves redelivered messages to the lane may leave a second copy.)
            let settle = async {
                env.settled("mixed").await;
                env.settled("mixed.redelivered").await;
            };
            tokio::select! {
                () = settle => {}
                () = async { while !worker.has_exited() { tokio::time::sleep(Duration::from_millis(50)).await } } => {
                    panic!("{queue_type}: the last worker died too:\n{}\nrecords: {:?}", worker.output(), lines(&path));
                }
            }
            assert_eq!(crashes, 3, "{queue_type}: records {:?}", lines(&path));
            assert_eq!(env.depth("mixed.dlq").await, 0, "the poison alone was dead-lettered");
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restarts_never_dead_letter_long_tasks() {
    for queue_type in ["classic", "quorum"] {
        let env = TestEnv::new(&format!("hostile-restarts-{queue_type}"));
        bounded(LIMIT, async {
            // A grace period far shorter than the tasks: every restart abandons them.
            let args = [
                "--tasks",
                "span",
                "--concurrency",
                "8",
                "--grace",
                "200ms",
                "--max-redeliveries",
                "2",
                "--queue-type",
                queue_type,
            ];
            let mut worker = env.worker(WORKER, &args).ready().await;
            let client = env.client().await;
            let path = env.path("spans");
            for _ in 0..8 {
                span::new(path.clone(), 1_500).delay(&client).await.unwrap();
            }
            let starts = || {
                lines(&path)
                    .iter()
                    .filter(|l| l.starts_with("start"))
                    .count()
            };
            for restart in 1..=6 {
                // All eight running (again), then a stop that cannot wait for them.
                eventually("the tasks to start", PATIENCE, || {
                    (starts() >= 8 * restart).then_some(())
                })
                .await;
                worker.signal("TERM");
                let status = worker.exit(PATIENCE).await;
                assert_eq!(
                    status.code(),
                    Some(3),
                    "the grace period ran out: {}",
                    worker.output()
                );
                worker = if restart < 6 {
                    env.worker(WORKER, &args).ready().await
                } else {
                    // The last one has time enough to run them all to their end.
                    env.worker(
                        WORKER,
                        &[
                            "--tasks",
                            "span",
                            "--concurrency",
                            "8",
                            "--queue-type",
                            queue_type,
                        ],
                    )
                    .ready()
                    .await
                };
            }
            let ended = eventually("all eight to end", PATIENCE, || {
                let ends: std::collections::BTreeSet<String> = lines(&path)
                    .iter()
                    .filter_map(|l| {
                        l.strip_prefix("end ")
                            .map(|rest| rest.split(' ').next().unwrap_or("").to_owned())
                    })
                    .collect();
                (ends.len() == 8).then_some(ends)
            })
            .await;
            assert_eq!(ended.len(), 8);
            env.settled("span").await;
            env.settled("span.redelivered").await;
            assert_eq!(
                env.depth("span.dlq").await,
                0,
                "{queue_type}: no dead letter"
            );
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_a_shared_queue_served_in_part_are_passed_on() {
    let env = TestEnv::new("hostile-partial");
    bounded(LIMIT, async {
        let shouter = env.worker(WORKER, &["--tasks", "shout"]).ready().await;
        let counter = env.worker(WORKER, &["--tasks", "word_count"]).ready().await;
        let client = env.client().await;
        let counts = amqp_tasks_tests::harness::concurrently(&client, 20, |client, i| async move {
            word_count::new(format!("{i} words here"))
                .call(&client)
                .await
        })
        .await;
        assert!(counts.iter().all(|c| *c == Ok(3)), "{counts:?}");
        let shouts = amqp_tasks_tests::harness::concurrently(&client, 20, |client, _| async move {
            shout::new("hi".into()).call(&client).await
        })
        .await;
        assert!(
            shouts.iter().all(|s| *s == Ok("HI".to_owned())),
            "{shouts:?}"
        );
        // A name no live worker serves is still dead-lettered at once.
        let started = Instant::now();
        let nobody = DynamicCall::new("nonesuch", json!({}))
            .queue("text")
            .call(&client)
            .await;
        assert!(
            matches!(nobody, Err(CallError::UnknownTask(_))),
            "{nobody:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        env.settled("text").await;
        let raw = env.raw().await;
        assert_eq!(dead_letter(&env, &raw, "text").await.0, "unknown_task");
        assert_eq!(
            env.depth("text.dlq").await,
            0,
            "nothing else was dead-lettered"
        );
        for worker in [&shouter, &counter] {
            assert_eq!(worker.output().matches("worker ready").count(), 1);
        }
    })
    .await;
}

/// Removes a broker policy when dropped, even after a failed assertion.
struct Policy(String);

impl Drop for Policy {
    fn drop(&mut self) {
        run_blocking(
            Command::new("rabbitmqctl").args(["clear_policy", "-q", &self.0]),
            Duration::from_secs(30),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_that_refuses_does_not_make_the_worker_spin() {
    let env = TestEnv::new("hostile-dlq");
    bounded(LIMIT, async {
        let worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        let client = env.client().await;
        let name = format!("dlq-full-{}", env.namespace);
        let pattern = format!("^{}$", env.queue("add.dlq").replace('.', "\\."));
        rabbitmqctl(&[
            "set_policy",
            "-q",
            &name,
            &pattern,
            r#"{"max-length": 0, "overflow": "reject-publish"}"#,
            "--apply-to",
            "queues",
        ])
        .await;
        let _policy = Policy(name);
        tokio::time::sleep(Duration::from_millis(500)).await; // policies apply asynchronously
        let raw = env.raw().await;
        let lines_before = worker.output().lines().count();
        for _ in 0..3 {
            let properties = BasicProperties::default()
                .with_content_type("application/x-bincode".into())
                .with_headers(headers("add"));
            publish(&raw, &env.queue("add"), properties, &[0xff; 8]).await;
        }
        // Normal work goes on while the three are held back.
        for _ in 0..5 {
            still_serving(&worker, &client).await;
        }
        // A window of observation: whatever the worker logs about them in 4 s stays small.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let logged = worker.output().lines().count() - lines_before;
        assert!(
            logged < 60,
            "{logged} log lines in 4 s:\n{}",
            worker.output()
        );
        // Nothing is lost: the three are still in their queue, held or given back.
        let counts = env.counts("add").await;
        assert_eq!(counts.ready + counts.unacked, 3, "{counts:?}");
        assert_eq!(env.depth("add.dlq").await, 0);
        still_serving(&worker, &client).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dead_letter_queue_does_not_make_the_worker_spin() {
    let env = TestEnv::new("hostile-nodlq");
    bounded(LIMIT, async {
        let worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        let client = env.client().await;
        let raw = env.raw().await;
        raw.channel
            .queue_delete(
                env.queue("add.dlq").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
        let lines_before = worker.output().lines().count();
        let properties = BasicProperties::default()
            .with_content_type("application/x-bincode".into())
            .with_headers(headers("add"));
        publish(&raw, &env.queue("add"), properties, &[0xff; 8]).await;
        still_serving(&worker, &client).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let logged = worker.output().lines().count() - lines_before;
        assert!(
            logged < 40,
            "{logged} log lines in 3 s:\n{}",
            worker.output()
        );
        let counts = env.counts("add").await;
        assert_eq!(counts.ready + counts.unacked, 1, "{counts:?}");
        still_serving(&worker, &client).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_anywhere_in_the_pipeline_are_answered_and_dead_lettered() {
    let env = TestEnv::new("hostile-panics");
    bounded(LIMIT, async {
        let worker = env
            .worker(
                WORKER,
                &[
                    "--tasks",
                    "explode_on_decode,explode_on_encode,explode_on_display,explode_on_cancel,add",
                ],
            )
            .ready()
            .await;
        let client = env.client().await;
        let raw = env.raw().await;
        let decode = explode_on_decode::new(Explosive(1)).call(&client).await;
        assert!(
            matches!(&decode, Err(CallError::Panicked(m)) if m.contains("Explosive cannot be decoded")),
            "{decode:?}"
        );
        let encode = explode_on_encode::new().call(&client).await;
        assert!(
            matches!(&encode, Err(CallError::Panicked(m)) if m.contains("Fragile cannot be encoded")),
            "{encode:?}"
        );
        let display = explode_on_display::new().call(&client).await;
        assert!(
            matches!(&display, Err(CallError::Panicked(m)) if m.contains("Unprintable cannot be shown")),
            "{display:?}"
        );
        let cancel = explode_on_cancel::new().call(&client).await;
        assert!(
            matches!(&cancel, Err(CallError::TimeLimit(m)) if m.contains("Tripwire dropped")),
            "{cancel:?}"
        );
        for (queue, reason) in [
            ("explode_on_decode", "panicked"),
            ("explode_on_encode", "panicked"),
            ("explode_on_display", "panicked"),
            ("explode_on_cancel", "time_limit"),
        ] {
            assert_eq!(dead_letter(&env, &raw, queue).await.0, reason, "{queue}");
            // The ack window kept moving: every message of the queue is acked.
            env.settled(queue).await;
        }
        still_serving(&worker, &client).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_id_never_runs_twice_at_once_across_a_session_loss() {
    let env = TestEnv::new("hostile-twice");
    bounded(LIMIT, async {
        let worker = env.worker(WORKER, &["--tasks", "hold,add"]).ready().await;
        let client = env.client().await;
        let path = env.path("holds");
        let release = env.path("release");
        hold::new(path.clone(), release.clone())
            .delay(&client)
            .await
            .unwrap();
        eventually("the task to start", PATIENCE, || {
            (!lines(&path).is_empty()).then_some(())
        })
        .await;
        // The worker loses its session while the task runs: the broker redelivers the task to
        // the worker's new session, while the first run goes on.
        assert_eq!(close_connections(&format!("pid {}", worker.pid())).await, 1);
        worker.wait_for("consumers stopped; resuming").await;
        worker.wait_for("moved to the redelivered lane").await;
        // A window for a second run to start beside the first, if it could: it must not.
        tokio::time::sleep(Duration::from_secs(1)).await;
        std::fs::write(&release, "go").unwrap();
        let deadline = Instant::now() + PATIENCE;
        let records = loop {
            let records = lines(&path);
            if records.iter().filter(|l| l.starts_with("end")).count() >= 2 {
                break records;
            }
            assert!(
                Instant::now() < deadline,
                "both runs did not end: {records:?}\n{}",
                worker.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let at = |line: &str| -> i64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
        let starts: Vec<i64> = records
            .iter()
            .filter(|l| l.starts_with("start"))
            .map(|l| at(l))
            .collect();
        let ends: Vec<i64> = records
            .iter()
            .filter(|l| l.starts_with("end"))
            .map(|l| at(l))
            .collect();
        assert_eq!((starts.len(), ends.len()), (2, 2), "{records:?}");
        assert!(
            starts[1] >= ends[0],
            "the redelivered copy started before the first run ended: {records:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_takes_its_slot_back() {
    let env = TestEnv::new("hostile-slot");
    bounded(LIMIT, async {
        let worker = env
            .worker(
                WORKER,
                &["--tasks", "abandon_call,busy_probe", "--concurrency", "1"],
            )
            .ready()
            .await;
        let _downstream = env.worker(WORKER, &["--tasks", "sleep_ms"]).ready().await;
        let client = env.client().await;
        let path = env.path("slot");
        abandon_call::new(path.clone(), 1_500)
            .delay(&client)
            .await
            .unwrap();
        worker.wait_for("task=\"abandon_call\"").await;
        for _ in 0..4 {
            busy_probe::new(path.clone(), 300)
                .delay(&client)
                .await
                .unwrap();
        }
        let records = eventually("the relay and four probes to finish", PATIENCE, || {
            let records = lines(&path);
            (records.len() == 5).then_some(records)
        })
        .await;
        let span = |line: &str| -> (i64, i64) {
            let parts: Vec<i64> = line
                .split(' ')
                .skip(1)
                .map(|n| n.parse().unwrap())
                .collect();
            (parts[0], parts[1])
        };
        let (busy_start, busy_end) = span(records.iter().find(|l| l.starts_with("busy")).unwrap());
        let probes: Vec<(i64, i64)> = records
            .iter()
            .filter(|l| l.starts_with("probe"))
            .map(|l| span(l))
            .collect();
        // While the relay waited, its slot was lent; once it gave up the call, it took the slot
        // back as soon as one was free, so some probes had to wait for it to end.
        let during = probes
            .iter()
            .filter(|(s, e)| *s < busy_end && *e > busy_start)
            .count();
        let after = probes.iter().filter(|(s, _)| *s >= busy_end - 20).count();
        assert!(
            during <= 2,
            "{during} probes ran beside the relay's busy time: {records:?}"
        );
        assert!(
            after >= 2,
            "probes waited for the relay's slot: {records:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_never_falls_back_to_plain_tcp() {
    let env = TestEnv::new("hostile-amqps");
    bounded(LIMIT, async {
        // Something that is no TLS server: it records the first bytes of every connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
        let recorder = tokio::spawn({
            let seen = seen.clone();
            async move {
                use tokio::io::AsyncReadExt;
                while let Ok((mut stream, _)) = listener.accept().await {
                    let mut first = [0u8; 8];
                    let read =
                        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut first))
                            .await;
                    if matches!(read, Ok(Ok(_))) {
                        seen.lock().unwrap().push(first.to_vec());
                    }
                }
            }
        });
        let url = format!("amqps://guest:s3cret@127.0.0.1:{port}/%2f");
        let refused = Client::connect(&url).await;
        let error = refused
            .expect_err("amqps to something that is no TLS server must not connect")
            .to_string();
        assert!(!error.contains("s3cret"), "{error}");
        // Even one told not to verify the server speaks TLS to it, and nothing else.
        let unverified = format!("{url}?verify=verify_none");
        let mut worker = WorkerProcess::spawn(
            WORKER,
            &["--tasks", "add"],
            &[
                ("AMQP_URL", &unverified),
                ("AMQP_TASKS_NAMESPACE", &env.namespace),
            ],
        );
        eventually("the worker to try", PATIENCE, || {
            (seen.lock().unwrap().len() >= 2 || worker.has_exited()).then_some(())
        })
        .await;
        worker.signal("KILL");
        let _ = worker.exit(PATIENCE).await;
        assert!(!worker.output().contains("s3cret"), "{}", worker.output());
        recorder.abort();
        // Every connection opened with a TLS handshake record (0x16, version 3.x), none with the
        // AMQP protocol header.
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty(), "nobody connected");
        for first in &seen {
            assert!(
                first[0] == 0x16 && first[1] == 0x03 && !first.starts_with(b"AMQP"),
                "not a TLS ClientHello: {first:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_cancelled_calls_and_replays() {
    let env = TestEnv::new("hostile-memory");
    bounded(LIMIT, async {
        let worker = env.worker(WORKER, &["--tasks", "add,touch"]).ready().await;
        let client = env.client().await;
        // Calls that time out, and calls whose futures are dropped, leave nothing waiting.
        let mut first = env.worker(WORKER, &["--tasks", "greet"]).ready().await;
        first.signal("TERM");
        first.exit(PATIENCE).await;
        let timed_out =
            amqp_tasks_tests::harness::concurrently(&client, 200, |client, _| async move {
                greet::new("x".into(), 1, None)
                    .timeout(Duration::from_millis(50))
                    .call(&client)
                    .await
            })
            .await;
        assert!(timed_out.iter().all(|r| *r == Err(CallError::Timeout)));
        let dropped: Vec<_> = (0..200)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { greet::new("y".into(), 1, None).call(&client).await })
            })
            .collect();
        eventually("the calls to be in flight", PATIENCE, || {
            (client.pending_calls() >= 100).then_some(())
        })
        .await;
        for call in dropped {
            call.abort();
        }
        eventually("nothing left waiting", PATIENCE, || {
            (client.pending_calls() == 0).then_some(())
        })
        .await;

        // A replay of one id among thousands of dead letters.
        let raw = env.raw().await;
        raw.channel
            .confirm_select(Default::default())
            .await
            .unwrap();
        const LETTERS: usize = 2_000;
        let mut confirms = Vec::with_capacity(LETTERS);
        for i in 0..LETTERS {
            let properties = BasicProperties::default()
                .with_message_id(format!("letter-{i}").as_str().into())
                .with_content_type("application/x-bincode".into())
                .with_headers(headers("add"));
            confirms.push(
                raw.channel
                    .basic_publish(
                        "".into(),
                        env.queue("add").as_str().into(),
                        BasicPublishOptions::default(),
                        &[0xff; 4],
                        properties,
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            confirm.await.unwrap();
        }
        env.settled("add").await;
        assert_eq!(env.depth("add.dlq").await, LETTERS as u32);
        let (code, stdout, stderr) = env
            .run(WORKER, &["dlq", "replay", "add", "--id", "letter-1234"])
            .await;
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains("replayed 1 message(s)"), "{stdout}");
        // The replayed one came back, was refused again, and the others stayed where they were.
        env.settled("add").await;
        assert_eq!(env.depth("add.dlq").await, LETTERS as u32);
        still_serving(&worker, &client).await;
    })
    .await;
}
