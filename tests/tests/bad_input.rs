//! Bad input never crashes or stalls a worker: the caller gets an error reply, the message goes
//! to `<queue>.dlq` with the reason, and the worker carries on.

use amqp_tasks::{CallError, task};
use amqp_tasks_tests::harness::{PATIENCE, Raw, TestEnv, bounded};
use amqp_tasks_tests::tasks::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(60);

struct Answer {
    kind: String,
    body: serde_json::Value,
    raw: Vec<u8>,
}

/// Publishes a hand-made message with a reply queue and returns the reply.
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
        .with_correlation_id("c-1".into())
        .with_message_id("m-1".into())
        .with_headers(headers);
    if let Some(content_type) = content_type {
        properties = properties.with_content_type(content_type.into());
    }
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
    let reply = raw.get(&reply_to, PATIENCE).await;
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("c-1")
    );
    let kind = reply
        .properties
        .kind()
        .as_ref()
        .map(|k| k.as_str().to_owned())
        .unwrap_or_default();
    let body = serde_json::from_slice(&reply.data).unwrap_or(serde_json::Value::Null);
    Answer {
        kind,
        body,
        raw: reply.data,
    }
}

/// The `error` reply body as documented in `amqp_tasks::wire` (bincode: the five fields in order),
/// written out here so that the test decodes what a worker really sends.
#[derive(Debug, serde::Deserialize)]
struct ErrorReply {
    error: ErrorBody,
}

#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    kind: String,
    #[serde(rename = "type")]
    type_name: String,
    message: String,
    args: Vec<String>,
    value: Option<()>,
}

/// Decodes a bincode error reply as another implementation of the wire format would.
fn bincode_error(answer: &Answer) -> ErrorBody {
    assert_eq!(answer.kind, "error");
    amqp_tasks::Codec::Bincode
        .decode::<ErrorReply>(&answer.raw)
        .unwrap_or_else(|e| panic!("a bincode error reply: {e}: {:?}", answer.raw))
        .error
}

fn task_header(name: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert("task".into(), AMQPValue::LongString(name.into()));
    headers
}

/// The dead letters of a queue: (reason, error) of each.
async fn dead_letters(
    env: &TestEnv,
    raw: &Raw,
    queue: &str,
    count: usize,
) -> Vec<(String, String)> {
    let mut letters = Vec::new();
    for _ in 0..count {
        let message = raw
            .get(&format!("{}.dlq", env.queue(queue)), PATIENCE)
            .await;
        let headers = message.properties.headers().clone().unwrap_or_default();
        let text = |key: &str| match headers.inner().get(key) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("dead letter header `{key}`: {other:?}"),
        };
        assert_eq!(text("dead_queue"), env.queue(queue));
        assert!(matches!(
            headers.inner().get("dead_at"),
            Some(AMQPValue::LongLongInt(_))
        ));
        assert_eq!(
            message.properties.delivery_mode(),
            &Some(2),
            "dead letters are persistent"
        );
        letters.push((text("dead_reason"), text("dead_error")));
    }
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_answered_and_dead_lettered() {
    let env = TestEnv::new("malformed");
    bounded(LIMIT, async {
        let _worker = env
            .worker(WORKER, &["--tasks", "add,sleep_ms"])
            .ready()
            .await;
        let raw = env.raw().await;
        let queue = env.queue("add");
        let bincode = Some("application/x-bincode");

        let garbage = send(&raw, &queue, bincode, task_header("add"), &[0xff; 40]).await;
        let truncated = send(&raw, &queue, bincode, task_header("add"), &[2]).await;
        let wrong_type = send(
            &raw,
            &queue,
            Some("text/plain"),
            task_header("add"),
            b"1 + 2",
        )
        .await;
        let no_type = send(&raw, &queue, None, task_header("add"), b"").await;
        let unknown = send(&raw, &queue, bincode, task_header("subtract"), &[2, 4]).await;
        let answers = [&garbage, &truncated, &wrong_type, &no_type, &unknown];
        for answer in answers {
            assert_eq!(answer.kind, "error");
        }
        // Replies in the request's codec (bincode here) except where the codec is unknown (JSON).
        assert!(garbage.body.is_null() && !garbage.raw.is_empty());
        for (answer, kind) in [
            (&garbage, "bad_payload"),
            (&truncated, "bad_payload"),
            (&unknown, "unknown_task"),
        ] {
            let error = bincode_error(answer);
            assert_eq!(error.kind, kind, "{error:?}");
            assert_eq!(
                error.args,
                std::slice::from_ref(&error.message),
                "{error:?}"
            );
            assert!(error.value.is_none(), "{error:?}");
        }
        let unknown_error = bincode_error(&unknown);
        assert_eq!(unknown_error.type_name, "UnknownTask");
        assert!(
            unknown_error.message.contains("subtract"),
            "{unknown_error:?}"
        );
        assert_eq!(wrong_type.body["error"]["kind"], "unsupported_content_type");
        assert_eq!(no_type.body["error"]["kind"], "unsupported_content_type");

        let letters = dead_letters(&env, &raw, "add", 5).await;
        let reasons: Vec<&str> = letters.iter().map(|(reason, _)| reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "bad_payload",
                "bad_payload",
                "unsupported_content_type",
                "unsupported_content_type",
                "unknown_task"
            ]
        );
        assert!(
            letters[4].1.contains("subtract") && letters[4].1.contains("add"),
            "{}",
            letters[4].1
        );

        // The worker carries on, and dead-letters nothing more: every message of the queue is
        // acked (so every dead letter was written) and the five are all there were.
        let client = env.client().await;
        assert_eq!(add::new(1, 2).call(&client).await, Ok(3));
        env.settled("add").await;
        assert_eq!(
            env.depth("add.dlq").await,
            0,
            "a good call is not dead-lettered"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_messages_from_any_language_call_rust_tasks() {
    let env = TestEnv::new("json");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "greet,math.div"]).ready().await;
        let raw = env.raw().await;
        let json = Some("application/json");
        let greet = env.queue("greet");

        let ok = send(&raw, &greet, json, FieldTable::default(), br#"{"name": "ann", "times": 2}"#).await;
        assert_eq!((ok.kind.as_str(), &ok.body), ("result", &serde_json::json!("hello ann, hello ann")));

        let with_option = send(&raw, &greet, json, task_header("greet"), br#"{"name": "bo", "times": 1, "suffix": "!"}"#).await;
        assert_eq!(with_option.body, serde_json::json!("hello bo!"));

        let missing = send(&raw, &greet, json, FieldTable::default(), br#"{"name": "ann"}"#).await;
        assert_eq!(missing.body["error"]["kind"], "bad_payload");
        assert!(missing.body["error"]["message"].as_str().unwrap().contains("missing argument `times`"));

        let unknown = send(&raw, &greet, json, FieldTable::default(), br#"{"name": "a", "times": 1, "color": 3}"#).await;
        assert!(unknown.body["error"]["message"].as_str().unwrap().contains("unknown argument `color`"));

        let wrong = send(&raw, &greet, json, FieldTable::default(), br#"{"name": "a", "times": "two"}"#).await;
        assert!(wrong.body["error"]["message"].as_str().unwrap().contains("argument `times`"));

        // A task error in JSON: aio-pika's shape, plus the typed value.
        let div = send(&raw, &env.queue("math.div"), json, FieldTable::default(), br#"{"a": 1, "b": 0}"#).await;
        assert_eq!(div.kind, "error");
        assert_eq!(
            div.body,
            serde_json::json!({"error": {"kind": "task", "type": "DivError", "message": "division by zero",
                "args": ["division by zero"], "value": "ByZero"}})
        );
        let reasons: Vec<String> = dead_letters(&env, &raw, "greet", 3).await.into_iter().map(|(reason, _)| reason).collect();
        assert_eq!(reasons, ["bad_payload"; 3]);
        // Once every message is acked, nothing else was dead-lettered: not the two good calls,
        // not the task error.
        env.settled("greet").await;
        env.settled("math.div").await;
        assert_eq!(env.depth("greet.dlq").await, 0, "good calls are not dead letters");
        assert_eq!(env.depth("math.div.dlq").await, 0, "a task error is not a dead letter");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_and_dead_lettered() {
    let env = TestEnv::new("panic");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "boom,add"]).ready().await;
        let client = env.client().await;
        assert_eq!(
            boom::new("kaboom".into()).call(&client).await,
            Err(CallError::Panicked("kaboom".into()))
        );
        // delayed: no one to answer, still dead-lettered
        boom::new("again".into()).delay(&client).await.unwrap();
        let raw = env.raw().await;
        let letters = dead_letters(&env, &raw, "boom", 2).await;
        assert_eq!(letters[0], ("panicked".into(), "kaboom".into()));
        assert_eq!(letters[1], ("panicked".into(), "again".into()));
        assert_eq!(
            add::new(2, 2).call(&client).await,
            Ok(4),
            "the worker keeps serving"
        );
        env.settled("boom").await;
        env.settled("add").await;
        assert_eq!(
            env.depth("boom.dlq").await,
            0,
            "two panics, two dead letters"
        );
        assert_eq!(env.depth("add.dlq").await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_its_time_limit_is_cancelled() {
    let env = TestEnv::new("time-limit");
    bounded(LIMIT, async {
        let _worker = env
            .worker(WORKER, &["--tasks", "overrun_write"])
            .ready()
            .await;
        let client = env.client().await;
        let path = env.path("overrun");
        let started = tokio::time::Instant::now();
        let result = overrun_write::new(path.clone(), 1_500).call(&client).await;
        assert!(
            matches!(&result, Err(CallError::TimeLimit(m)) if m.contains("300ms")),
            "{result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "answered at the limit"
        );
        // The handler is really stopped, not left running behind the answer: its future is
        // dropped (which writes `.dropped`), so what it would do after its sleep never happens.
        amqp_tasks_tests::harness::eventually("the handler to be dropped", PATIENCE, || {
            std::fs::metadata(format!("{path}.dropped")).ok()
        })
        .await;
        assert!(
            std::fs::metadata(format!("{path}.late")).is_err(),
            "the handler ran on past its time limit"
        );
        let raw = env.raw().await;
        assert_eq!(
            dead_letters(&env, &raw, "overrun_write", 1).await[0].0,
            "time_limit"
        );
    })
    .await;
}

/// An outdated stub of `add`: same name, other argument types.
#[task(name = "add")]
async fn stale_add(a: i32, b: i32) -> i64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stub_whose_signature_differs_is_refused() {
    let env = TestEnv::new("signature");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        let client = env.client().await;
        match stale_add::new(1, 2).call(&client).await {
            Err(CallError::SignatureMismatch(message)) => {
                assert!(message.contains("(i64, i64) -> i64"), "{message}");
            }
            other => panic!("expected a signature mismatch, got {other:?}"),
        }
        let raw = env.raw().await;
        assert_eq!(
            dead_letters(&env, &raw, "add", 1).await[0].0,
            "signature_mismatch"
        );
        assert_eq!(add::new(1, 2).call(&client).await, Ok(3));
        env.settled("add").await;
        assert_eq!(env.depth("add.dlq").await, 0);
    })
    .await;
}

/// A task the `add` worker does not serve, sent to its queue.
#[task(name = "subtract", queue = "add")]
async fn subtract(a: i64, b: i64) -> i64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_decodes_framework_errors_into_their_variants() {
    let env = TestEnv::new("client-errors");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "add,greet"]).ready().await;
        let client = env.client().await;
        // bincode error replies, through the typed stub
        match subtract::new(3, 1).call(&client).await {
            Err(CallError::UnknownTask(message)) => {
                assert!(
                    message.contains("subtract") && message.contains("add"),
                    "{message}"
                );
            }
            other => panic!("expected UnknownTask, got {other:?}"),
        }
        // JSON error replies, through a dynamic call
        let wrong =
            amqp_tasks::DynamicCall::new("greet", serde_json::json!({"name": "x", "times": "two"}))
                .call(&client)
                .await;
        match wrong {
            Err(CallError::BadPayload(message)) => {
                assert!(message.contains("argument `times`"), "{message}");
            }
            other => panic!("expected BadPayload, got {other:?}"),
        }
        let unknown = amqp_tasks::DynamicCall::new("subtract", serde_json::json!({"a": 1, "b": 2}))
            .queue("add")
            .call(&client)
            .await;
        assert!(
            matches!(unknown, Err(CallError::UnknownTask(_))),
            "{unknown:?}"
        );
        let raw = env.raw().await;
        let reasons: Vec<String> = dead_letters(&env, &raw, "add", 2)
            .await
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(reasons, ["unknown_task"; 2]);
        assert_eq!(
            dead_letters(&env, &raw, "greet", 1).await[0].0,
            "bad_payload"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_of_the_previous_release_is_accepted() {
    let env = TestEnv::new("legacy-signature");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "walk"]).ready().await;
        let client = env.client().await;
        // Today's stub: the types as written.
        assert_eq!(walk::new(21).call(&client).await, Ok(42));
        // What a stub built by an earlier release sends: the fingerprint of `type_name`'s text,
        // which differs for an alias. A rolling upgrade must not answer `SignatureMismatch`.
        use amqp_tasks::Task;
        let signature = walk::signature();
        let legacy = signature
            .legacy_fingerprint()
            .expect("an alias gives two fingerprints")
            .to_owned();
        assert_ne!(legacy, signature.fingerprint());
        let raw = env.raw().await;
        let body = amqp_tasks::Codec::Bincode.encode(&(5u32,)).unwrap();
        let mut headers = task_header("walk");
        headers.insert(
            "signature".into(),
            AMQPValue::LongString(legacy.as_str().into()),
        );
        let answer = send(
            &raw,
            &env.queue("walk"),
            Some("application/x-bincode"),
            headers,
            &body,
        )
        .await;
        assert_eq!(answer.kind, "result");
        assert_eq!(
            amqp_tasks::Codec::Bincode.decode::<u32>(&answer.raw),
            Ok(10)
        );
        // Any other fingerprint is still refused.
        let mut headers = task_header("walk");
        headers.insert(
            "signature".into(),
            AMQPValue::LongString("0123456789abcdef".into()),
        );
        let refused = send(
            &raw,
            &env.queue("walk"),
            Some("application/x-bincode"),
            headers,
            &body,
        )
        .await;
        assert_eq!(bincode_error(&refused).kind, "signature_mismatch");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_past_its_deadline_is_not_started() {
    let env = TestEnv::new("expired");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "touch"]).ready().await;
        let raw = env.raw().await;
        let marker = env.path("expired");
        let body = amqp_tasks::Codec::Json
            .encode(&serde_json::json!({"path": marker, "ms": 0}))
            .unwrap();
        let mut headers = task_header("touch");
        let past = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            - 1_000;
        headers.insert("deadline".into(), AMQPValue::LongLongInt(past));
        let answer = send(
            &raw,
            &env.queue("touch"),
            Some("application/json"),
            headers,
            &body,
        )
        .await;
        assert_eq!(answer.body["error"]["kind"], "deadline");
        assert!(
            std::fs::metadata(format!("{marker}.started")).is_err(),
            "the task must not have run"
        );
        env.settled("touch").await;
        assert_eq!(
            env.depth("touch.dlq").await,
            0,
            "an expired call is answered, not dead-lettered"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let env = TestEnv::new("oversized");
    bounded(LIMIT, async {
        let _worker = env
            .worker(WORKER, &["--tasks", "greet", "--max-body-size", "1000"])
            .ready()
            .await;
        let client = env.client().await;
        let result = greet::new("x".repeat(2_000), 1, None).call(&client).await;
        assert!(
            matches!(&result, Err(CallError::Rejected(m)) if m.contains("at most 1000")),
            "{result:?}"
        );
        let raw = env.raw().await;
        assert_eq!(dead_letters(&env, &raw, "greet", 1).await[0].0, "too_large");
        assert_eq!(
            greet::new("y".into(), 1, None).call(&client).await,
            Ok("hello y".into())
        );
        env.settled("greet").await;
        assert_eq!(env.depth("greet.dlq").await, 0);
    })
    .await;
}
