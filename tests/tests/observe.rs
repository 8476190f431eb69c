//! Observing a fleet, end to end: a `test-worker` process with `--metrics-addr` scraped over
//! HTTP by the test.

use amqp_tasks::CallError;
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, WorkerProcess, bounded};
use amqp_tasks_tests::tasks::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(60);

/// The address a worker logged for its metrics (`serving metrics on http://ADDR/metrics`).
async fn metrics_addr(worker: &WorkerProcess) -> String {
    let line = worker.wait_for("serving metrics on http://").await;
    let start = line.find("http://").expect("a URL") + "http://".len();
    let rest = &line[start..];
    rest[..rest.find("/metrics").expect("the path")].to_owned()
}

/// `GET /metrics` over plain HTTP/1.1: (status line, body).
async fn scrape(addr: &str) -> (String, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8(response).expect("a text response")
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("the metrics endpoint answered in time");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers and body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of the sample `name` (with its labels, as exposed) in a scrape, if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_outcome_exactly() {
    let env = TestEnv::new("metrics");
    bounded(LIMIT, async {
        let worker = env
            .worker(
                WORKER,
                &["--tasks", "add,math.div", "--metrics-addr", "127.0.0.1:0"],
            )
            .ready()
            .await;
        let addr = metrics_addr(&worker).await;
        let client = env.client().await;
        for i in 0..10 {
            assert_eq!(add::new(i, 1).call(&client).await, Ok(i + 1));
        }
        for _ in 0..3 {
            assert_eq!(
                div::new(1, 0).call(&client).await,
                Err(CallError::Task(DivError::ByZero))
            );
        }
        let succeeded = r#"amqp_tasks_tasks_total{task="add",outcome="succeeded"}"#;
        let failed = r#"amqp_tasks_tasks_total{task="math.div",outcome="failed"}"#;
        // A reply reaches the caller just before its message is counted as settled: wait
        // (bounded) for the last count, then every figure must be exact.
        let deadline = Instant::now() + PATIENCE;
        let text = loop {
            let (status, text) = scrape(&addr).await;
            assert!(status.contains(" 200 "), "{status}");
            if sample(&text, succeeded) == Some(10.0) && sample(&text, failed) == Some(3.0) {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "the counts never arrived:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let outcomes: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("amqp_tasks_tasks_total{"))
            .collect();
        assert_eq!(outcomes.len(), 2, "no other outcome: {outcomes:?}");
        let expect = [
            (
                r#"amqp_tasks_task_duration_seconds_count{task="add"}"#,
                10.0,
            ),
            (
                r#"amqp_tasks_task_duration_seconds_count{task="math.div"}"#,
                3.0,
            ),
            ("amqp_tasks_tasks_in_flight", 0.0),
            ("amqp_tasks_broker_sessions_total", 1.0),
        ];
        for (name, value) in expect {
            assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
        }
        // A task error without retries is an answer, not a dead letter.
        assert!(
            !text.contains("amqp_tasks_dead_letters_total{"),
            "no dead letters:\n{text}"
        );

        // A message refused before running is `rejected`, and its dead letter is counted apart.
        let raw = env.raw().await;
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "task".into(),
            lapin::types::AMQPValue::LongString("math.div".into()),
        );
        raw.channel
            .basic_publish(
                "".into(),
                env.queue("math.div").as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                b"not json",
                lapin::BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let rejected = r#"amqp_tasks_tasks_total{task="math.div",outcome="rejected"}"#;
        let dead = r#"amqp_tasks_dead_letters_total{task="math.div",reason="bad_payload"}"#;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, text) = scrape(&addr).await;
            if sample(&text, rejected) == Some(1.0) {
                assert_eq!(sample(&text, dead), Some(1.0), "{text}");
                assert_eq!(sample(&text, failed), Some(3.0), "{text}");
                let runs = r#"amqp_tasks_task_duration_seconds_count{task="math.div"}"#;
                assert_eq!(sample(&text, runs), Some(3.0), "it did not run: {text}");
                break;
            }
            assert!(Instant::now() < deadline, "no rejection counted:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// The value of `field="..."` in a log line.
fn field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let key = format!("{field}=\"");
    let start = line.find(&key)? + key.len();
    let length = line[start..].find('"')?;
    Some(&line[start..start + length])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_is_a_task_span_tied_to_its_caller() {
    let env = TestEnv::new("spans");
    bounded(LIMIT, async {
        let worker = env
            .worker(WORKER, &["--tasks", "relay_div,math.div"])
            .ready()
            .await;
        let client = env.client().await;
        let relay = relay_div::new(6, 3).delay(&client).await.expect("delay");
        // The relay's span: its name, id, first attempt and a trace id.
        let opened = format!("task{{name=\"relay_div\" id=\"{relay}\" attempt=1 trace_id=\"");
        let line = worker.wait_for(&opened).await;
        assert!(line.contains("task started"), "{line}");
        let trace_id = field(&line, "trace_id").expect("a trace id").to_owned();
        assert_eq!(trace_id.len(), 32, "{line}");
        // The call it made runs in a span of its own, with the relay as its parent, in the same
        // trace; the framework's own lines of that run are inside it.
        let child = worker.wait_for(&format!("parent_id=\"{relay}\"")).await;
        assert_eq!(field(&child, "name"), Some("math.div"), "{child}");
        assert_eq!(field(&child, "trace_id"), Some(trace_id.as_str()), "{child}");
        assert_ne!(field(&child, "id"), Some(relay.as_str()), "{child}");
        let child_id = field(&child, "id").expect("the child's id").to_owned();
        let ended = worker
            .wait_for(&format!("id=\"{child_id}\" attempt=1"))
            .await;
        assert!(ended.contains("task{"), "{ended}");
        worker
            .wait_for(&format!("id=\"{relay}\" attempt=1 trace_id=\"{trace_id}\"}}: amqp_tasks::worker::delivery: task ended outcome=\"succeeded\""))
            .await;
    })
    .await;
}

const SHELL: &str = env!("CARGO_BIN_EXE_test-shell");

/// `amqp-tasks events ...` running in the test's namespace, once it listens.
async fn listen(env: &TestEnv, args: &[&str]) -> WorkerProcess {
    let mut all = vec!["events"];
    all.extend_from_slice(args);
    let listener = env.worker(SHELL, &all);
    listener.wait_for("listening for events on").await;
    listener
}

/// The events a listener printed, parsed.
fn printed(listener: &WorkerProcess) -> Vec<serde_json::Value> {
    listener
        .output()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_each_task_received_started_then_its_outcome() {
    let env = TestEnv::new("events");
    bounded(LIMIT, async {
        let all = listen(&env, &[]).await;
        let adds_only = listen(&env, &["--task", "add"]).await;
        let _worker = env
            .worker(WORKER, &["--tasks", "add,math.div", "--events"])
            .ready()
            .await;
        let client = env.client().await;
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                add::new(i, i)
                    .delay(&client)
                    .await
                    .expect("delay")
                    .to_string(),
            );
        }
        assert_eq!(
            div::new(1, 0).call(&client).await,
            Err(CallError::Task(DivError::ByZero))
        );
        let deadline = Instant::now() + PATIENCE;
        let events = loop {
            let events = printed(&all);
            let done = |id: &str| {
                events
                    .iter()
                    .any(|e| e["id"] == id && e["event"] == "succeeded")
            };
            let failed = events.iter().any(|e| e["event"] == "failed");
            if ids.iter().all(|id| done(id)) && failed {
                break events;
            }
            assert!(Instant::now() < deadline, "missing events: {events:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let online = &events[0];
        assert_eq!(online["event"], "online", "{events:#?}");
        let worker_id = online["worker"].as_str().expect("a worker id").to_owned();
        assert!(
            worker_id.ends_with(&format!(":{}", _worker.pid())),
            "{worker_id}"
        );
        for id in &ids {
            let seen: Vec<&str> = events
                .iter()
                .filter(|e| e["id"] == id.as_str())
                .map(|e| e["event"].as_str().unwrap_or_default())
                .collect();
            assert_eq!(
                seen,
                ["received", "started", "succeeded"],
                "{id}: {events:#?}"
            );
            for event in events.iter().filter(|e| e["id"] == id.as_str()) {
                assert_eq!(event["task"], "add");
                assert_eq!(event["attempt"], 1);
                assert_eq!(event["worker"], worker_id.as_str());
                assert!(event["at_ms"].as_u64().is_some_and(|at| at > 0), "{event}");
            }
        }
        let failed = events
            .iter()
            .find(|e| e["event"] == "failed")
            .expect("the failure");
        assert_eq!(failed["task"], "math.div");
        assert_eq!(failed["error"], "division by zero", "{failed}");

        // `--task add` prints that task's events only: no worker events, no `math.div`.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let events = printed(&adds_only);
            let succeeded = events.iter().filter(|e| e["event"] == "succeeded").count();
            if succeeded == ids.len() {
                assert_eq!(events.len(), 3 * ids.len(), "{events:#?}");
                assert!(events.iter().all(|e| e["task"] == "add"), "{events:#?}");
                break;
            }
            assert!(Instant::now() < deadline, "missing events: {events:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// `amqp-tasks inspect ...`: (exit code, each answer parsed, stderr).
async fn inspect(env: &TestEnv, args: &[&str]) -> (i32, Vec<serde_json::Value>, String) {
    let mut all = vec!["inspect"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = env.run(SHELL, &all).await;
    let answers = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    (code, answers, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_ping_is_answered_by_every_worker_and_active_shows_a_running_task() {
    let env = TestEnv::new("inspect");
    bounded(LIMIT, async {
        // No worker: nobody answers, exit 3.
        let (code, answers, stderr) = inspect(&env, &["ping", "--timeout", "300ms"]).await;
        assert_eq!((code, answers.len()), (3, 0), "{stderr}");
        assert!(stderr.contains("no worker answered"), "{stderr}");

        let first = env.worker(WORKER, &["--tasks", "touch,add"]).ready().await;
        let second = env.worker(WORKER, &["--tasks", "touch,add"]).ready().await;
        for worker in [&first, &second] {
            worker.wait_for("answering inspect requests").await;
        }
        let (code, answers, stderr) = inspect(&env, &["ping"]).await;
        assert_eq!(code, 0, "{stderr}");
        let mut workers: Vec<String> = answers
            .iter()
            .map(|a| {
                assert_eq!(a["pong"], true, "{a}");
                a["worker"].as_str().expect("an id").to_owned()
            })
            .collect();
        workers.sort();
        let mut expected = vec![format!(":{}", first.pid()), format!(":{}", second.pid())];
        expected.sort();
        assert_eq!(workers.len(), 2, "two answers: {answers:?}");
        for pid in &expected {
            assert!(
                workers.iter().any(|w| w.ends_with(pid.as_str())),
                "{workers:?}"
            );
        }

        let (code, answers, _) = inspect(&env, &["registered"]).await;
        assert_eq!((code, answers.len()), (0, 2));
        for answer in &answers {
            assert_eq!(
                answer["tasks"],
                serde_json::json!(["add", "touch"]),
                "{answer}"
            );
        }

        // A task that runs for a while shows in `active`, on the worker running it.
        let client = env.client().await;
        let marker = env.path("long");
        let id = touch::new(marker.clone(), 5_000)
            .delay(&client)
            .await
            .expect("delay")
            .to_string();
        let started = format!("{marker}.started");
        amqp_tasks_tests::harness::eventually("the task to start", PATIENCE, || {
            std::fs::metadata(&started).ok()
        })
        .await;
        let (code, answers, _) = inspect(&env, &["active", "--timeout", "1s"]).await;
        assert_eq!((code, answers.len()), (0, 2));
        let running: Vec<&serde_json::Value> = answers
            .iter()
            .flat_map(|a| a["active"].as_array().expect("a list"))
            .collect();
        assert_eq!(running.len(), 1, "{answers:?}");
        assert_eq!(running[0]["task"], "touch");
        assert_eq!(running[0]["id"], id.as_str());
        assert!(running[0]["running_ms"].as_u64().is_some(), "{answers:?}");

        let (code, answers, _) = inspect(&env, &["stats"]).await;
        assert_eq!((code, answers.len()), (0, 2));
        let in_flight: u64 = answers
            .iter()
            .map(|a| a["in_flight"].as_u64().unwrap())
            .sum();
        assert_eq!(in_flight, 1, "{answers:?}");

        let (code, _, stderr) = inspect(&env, &["nonsense"]).await;
        assert_eq!(code, 2, "{stderr}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_task_never_runs_even_on_a_worker_started_after_the_revoke() {
    let env = TestEnv::new("revoke");
    bounded(LIMIT, async {
        let mut first = env.worker(WORKER, &["--tasks", "record,add"]).ready().await;
        let client = env.client().await;
        let path = env.path("record");
        let delayed = format!("revoked-delay-{}", uuid::Uuid::new_v4().simple());
        let called = format!("revoked-call-{}", uuid::Uuid::new_v4().simple());
        let kept = format!("kept-{}", uuid::Uuid::new_v4().simple());
        let countdown = Duration::from_secs(3);
        record::new(path.clone(), 1)
            .task_id(delayed.clone())
            .countdown(countdown)
            .delay(&client)
            .await
            .expect("delay");
        record::new(path.clone(), 2)
            .task_id(kept.clone())
            .countdown(countdown)
            .delay(&client)
            .await
            .expect("delay");
        let waiting = {
            let (client, called) = (client.clone(), called.clone());
            tokio::spawn(async move {
                add::new(1, 2)
                    .task_id(called)
                    .countdown(countdown)
                    .timeout(Duration::from_secs(20))
                    .call(&client)
                    .await
            })
        };
        let (code, stdout, stderr) = env.run(SHELL, &["revoke", &delayed, &called]).await;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("revoked 2 task(s)"), "{stdout}");
        // The worker that saw the revoke goes away before the countdowns end: the one that runs
        // them read the revocation from the broker when it started.
        first.signal("KILL");
        first.exit(PATIENCE).await;
        let second = env.worker(WORKER, &["--tasks", "record,add"]).ready().await;
        let answer = waiting.await.expect("the call's task");
        assert_eq!(answer, Err(amqp_tasks::CallError::Revoked));
        // The task not revoked runs; the revoked one never does, and is not dead-lettered.
        amqp_tasks_tests::harness::eventually("the kept task to run", PATIENCE, || {
            std::fs::read_to_string(&path)
                .ok()
                .filter(|t| t.contains('2'))
        })
        .await;
        second.wait_for(&format!("id=\"{delayed}\"")).await;
        env.settled("record").await;
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "2");
        assert_eq!(env.depth("record.dlq").await, 0);
        assert_eq!(env.depth("add.dlq").await, 0);
        let line = second.wait_for("revoked: not run").await;
        assert!(line.contains(&delayed) || line.contains(&called), "{line}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_with_terminate_cancels_a_running_task() {
    let env = TestEnv::new("terminate");
    bounded(LIMIT, async {
        let worker = env
            .worker(WORKER, &["--tasks", "touch", "--events"])
            .ready()
            .await;
        let listener = listen(&env, &["--task", "touch"]).await;
        let client = env.client().await;
        let marker = env.path("long");
        let id = format!("terminated-{}", uuid::Uuid::new_v4().simple());
        let waiting = {
            let (client, marker, id) = (client.clone(), marker.clone(), id.clone());
            tokio::spawn(async move {
                touch::new(marker, 20_000)
                    .task_id(id)
                    .timeout(Duration::from_secs(40))
                    .call(&client)
                    .await
            })
        };
        let started = format!("{marker}.started");
        amqp_tasks_tests::harness::eventually("the task to start", PATIENCE, || {
            std::fs::metadata(&started).ok()
        })
        .await;
        let begun = Instant::now();
        let (code, _, stderr) = env.run(SHELL, &["revoke", &id, "--terminate"]).await;
        assert_eq!(code, 0, "{stderr}");
        let answer = waiting.await.expect("the call's task");
        assert_eq!(answer, Err(amqp_tasks::CallError::Revoked));
        assert!(
            begun.elapsed() < Duration::from_secs(15),
            "cancelled, not finished"
        );
        worker
            .wait_for("task revoked while running: cancelled")
            .await;
        env.settled("touch").await;
        assert_eq!(env.depth("touch.dlq").await, 0, "not dead-lettered");
        assert!(std::fs::metadata(format!("{marker}.done")).is_err());
        // Its outcome is `revoked`.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let events = printed(&listener);
            if let Some(event) = events
                .iter()
                .find(|e| e["id"] == id.as_str() && e["event"] == "revoked")
            {
                assert_eq!(event["task"], "touch");
                break;
            }
            assert!(Instant::now() < deadline, "no revoked event: {events:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
