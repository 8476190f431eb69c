//! `amqp_tasks::testing::TestWorker`: tasks run in-process, as a worker runs them, without a
//! broker; waits in tokio time (paused here, so an hour of backoff takes no wall time).

use amqp_tasks::testing::TestWorker;
use amqp_tasks::{CallError, Context, DynamicCall, Retryable, State, task};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;

#[task]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DivError {
    ByZero,
}

impl std::fmt::Display for DivError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("division by zero")
    }
}

#[task(name = "math.div")]
pub async fn div(a: i64, b: i64) -> Result<i64, DivError> {
    if b == 0 {
        return Err(DivError::ByZero);
    }
    Ok(a / b)
}

#[task]
pub async fn boom(message: String) -> u32 {
    panic!("{message}")
}

#[task(timeout = "2s")]
pub async fn stuck() {
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FlakyError {
    NotYet(u32),
    Fatal,
}

impl Retryable for FlakyError {
    fn is_retryable(&self) -> bool {
        matches!(self, FlakyError::NotYet(_))
    }
}

/// Fails with `NotYet` until its `attempt` reaches `succeed_at` (an hour of backoff between).
#[task(retries = 3, backoff = "1h")]
pub async fn flaky(ctx: Context, succeed_at: u32) -> Result<u32, FlakyError> {
    if ctx.attempt() < succeed_at {
        return Err(FlakyError::NotYet(ctx.attempt()));
    }
    Ok(ctx.attempt())
}

#[task(retries = 3, backoff = "1s")]
pub async fn fatal() -> Result<(), FlakyError> {
    Err(FlakyError::Fatal)
}

/// Served by another service: only a mock can answer it here.
#[task(name = "billing.charge")]
pub async fn charge(order: u64, cents: u64) -> Result<String, String>;

/// A relay: calls `charge` (mocked) and `add` (linked) through its context.
#[task]
pub async fn checkout(ctx: Context, order: u64) -> Result<String, String> {
    let total = add::new(40, 2)
        .call(&ctx)
        .await
        .map_err(|e| e.to_string())?;
    charge::new(order, total as u64)
        .call(&ctx)
        .await
        .map_err(|e| format!("charge: {e}"))
}

pub struct Ledger {
    entries: Mutex<Vec<String>>,
}

/// Writes to its state; and delays another task from inside.
#[task]
pub async fn book(ctx: Context, ledger: State<Ledger>, entry: String) -> usize {
    let n = {
        let mut entries = ledger.entries.lock().unwrap();
        entries.push(entry);
        entries.len()
    };
    let _ = add::new(1, 1)
        .countdown(Duration::from_secs(30))
        .delay(&ctx)
        .await;
    n
}

fn ledger() -> Ledger {
    Ledger {
        entries: Mutex::new(Vec::new()),
    }
}

#[tokio::test(start_paused = true)]
async fn results_and_typed_errors_as_from_a_worker() {
    let test = TestWorker::new();
    assert_eq!(add::new(1, 2).call(&test).await, Ok(3));
    assert_eq!(div::new(7, 2).call(&test).await, Ok(3));
    assert_eq!(
        div::new(1, 0).call(&test).await,
        Err(CallError::Task(DivError::ByZero))
    );
    assert_eq!(
        boom::new("kaput".into()).call(&test).await,
        Err(CallError::Panicked("kaput".into()))
    );
    // Arguments travel encoded: the JSON codec, and a body the task cannot read.
    assert_eq!(
        add::new(2, 2)
            .codec(amqp_tasks::Codec::Json)
            .call(&test)
            .await,
        Ok(4)
    );
    let bad = DynamicCall::new("add", serde_json::json!({"a": 1}))
        .call(&test.client())
        .await;
    assert!(
        matches!(&bad, Err(CallError::BadPayload(m)) if m.contains("`b`")),
        "{bad:?}"
    );
    let letters = test.dead_letters();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].reason, "panicked");
    assert_eq!(letters[1].reason, "bad_payload");
}

#[tokio::test(start_paused = true)]
async fn time_limits_and_backoffs_run_in_tokio_time() {
    let test = TestWorker::new();
    let started = Instant::now();
    let limited = stuck::new().call(&test).await;
    assert!(
        matches!(&limited, Err(CallError::TimeLimit(m)) if m.contains("2s")),
        "{limited:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(2));

    // Two failures an hour (±20 %) apart each, then success on the third attempt.
    let started = Instant::now();
    assert_eq!(flaky::new(3).call(&test).await, Ok(3));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2 * 3600 * 8 / 10),
        "{waited:?}"
    );
    assert_eq!(test.runs(), 4);

    // `Retryable` says no: one run, then dead-lettered with the history a worker writes.
    assert_eq!(
        fatal::new().call(&test).await,
        Err(CallError::Task(FlakyError::Fatal))
    );
    assert_eq!(test.runs(), 5);
    let letters = test.dead_letters();
    assert_eq!(letters.last().unwrap().reason, "task");
}

#[tokio::test(start_paused = true)]
async fn delays_wait_for_run_until_idle() {
    let test = TestWorker::new();
    add::new(1, 2)
        .countdown(Duration::from_secs(60))
        .delay(&test)
        .await
        .unwrap();
    flaky::new(2).delay(&test).await.unwrap();
    assert_eq!(test.pending(), 2);
    assert_eq!(test.runs(), 0, ".delay() only enqueues");
    let started = Instant::now();
    // add once, flaky twice (one retry, an hour later).
    assert_eq!(test.run_until_idle().await, 3);
    assert!(started.elapsed() >= Duration::from_secs(3600 * 8 / 10) - Duration::from_millis(100));
    assert_eq!(test.pending(), 0);
    assert_eq!(test.run_until_idle().await, 0);
}

#[tokio::test(start_paused = true)]
async fn mocks_state_and_relays() {
    // A task served elsewhere, not mocked: as on a broker where nobody declared its queue.
    let unmocked = TestWorker::new();
    assert!(matches!(
        charge::new(1, 1).call(&unmocked).await,
        Err(CallError::NoRoute { .. })
    ));
    assert!(matches!(
        charge::new(1, 1).delay(&unmocked).await,
        Err(CallError::NoRoute { .. })
    ));

    let charged = std::sync::Arc::new(AtomicU32::new(0));
    let test = TestWorker::new().state(ledger()).mock::<charge>({
        let charged = charged.clone();
        move |(order, cents)| {
            charged.fetch_add(1, Ordering::SeqCst);
            async move { Ok(format!("receipt {order}: {cents}")) }
        }
    });
    assert_eq!(
        checkout::new(9).call(&test).await,
        Ok("receipt 9: 42".to_owned())
    );
    assert_eq!(charged.load(Ordering::SeqCst), 1);
    // A mock replaces a linked handler too.
    let test = test.mock::<add>(|(a, b)| async move { Ok(a * b) });
    assert_eq!(add::new(6, 7).call(&test).await, Ok(42));

    // State: given once, shared by every run; what the task delays waits for run_until_idle.
    assert_eq!(book::new("a".into()).call(&test).await, Ok(1));
    assert_eq!(book::new("b".into()).call(&test).await, Ok(2));
    assert_eq!(test.pending(), 2);
    assert_eq!(test.run_until_idle().await, 2);

    // Without the state, the call says what is missing.
    let stateless = TestWorker::new();
    let missing = book::new("c".into()).call(&stateless).await;
    assert!(
        matches!(&missing, Err(CallError::UnknownTask(m)) if m.contains("needs State<Ledger>")),
        "{missing:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn calls_may_wait_longer_than_the_task_runs() {
    let test = TestWorker::new();
    // A countdown beyond the task's time limit: the default deadline includes it.
    let started = Instant::now();
    assert_eq!(
        stuck_free::new(5)
            .countdown(Duration::from_secs(10))
            .call(&test)
            .await,
        Ok(5)
    );
    // (Countdowns are taken from the wall clock, which moves on a little while tokio's is paused:
    // a worker's delay resolution is 100 ms.)
    assert!(
        started.elapsed() >= Duration::from_millis(9_900),
        "{:?}",
        started.elapsed()
    );
    // An explicit timeout shorter than the countdown cannot be met, and says how to fix it.
    let short = stuck_free::new(5)
        .countdown(Duration::from_secs(10))
        .timeout(Duration::from_secs(3))
        .call(&test)
        .await;
    assert!(
        matches!(&short, Err(CallError::Rejected(m)) if m.contains("longer than its countdown")),
        "{short:?}"
    );
    // A timeout longer than the task's time limit is kept (not cut to the limit).
    let long = stuck_free::new(6)
        .countdown(Duration::from_secs(20))
        .timeout(Duration::from_secs(25))
        .call(&test)
        .await;
    assert_eq!(long, Ok(6));
}

#[task(timeout = "1s")]
pub async fn stuck_free(x: u64) -> u64 {
    x
}
