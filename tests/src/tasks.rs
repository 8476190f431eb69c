//! The tasks the end-to-end tests call.

use amqp_tasks::{CallError, Context, State, task};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[task]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DivError {
    ByZero,
    Overflow { a: i64, b: i64 },
}

impl std::fmt::Display for DivError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DivError::ByZero => f.write_str("division by zero"),
            DivError::Overflow { a, b } => write!(f, "{a} / {b} overflows"),
        }
    }
}

#[task(name = "math.div")]
pub async fn div(a: i64, b: i64) -> Result<i64, DivError> {
    if b == 0 {
        return Err(DivError::ByZero);
    }
    a.checked_div(b).ok_or(DivError::Overflow { a, b })
}

#[task]
pub async fn boom(message: String) -> u32 {
    panic!("{message}")
}

#[task(timeout = "30s")]
pub async fn sleep_ms(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Writes `<path>.started`, waits, then appends this process id to `<path>.done`.
#[task(timeout = "30s")]
pub async fn touch(path: String, ms: u64) -> u32 {
    let _ = std::fs::write(format!("{path}.started"), std::process::id().to_string());
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let mut done = std::fs::read_to_string(format!("{path}.done")).unwrap_or_default();
    done.push_str(&format!("{}\n", std::process::id()));
    let _ = std::fs::write(format!("{path}.done"), done);
    std::process::id()
}

#[task]
pub async fn remaining_ms(ctx: Context) -> Option<u64> {
    ctx.remaining().map(|d| d.as_millis() as u64)
}

#[task]
pub async fn context_info(ctx: Context) -> (String, String, Option<String>, u32, bool) {
    (
        ctx.trace_id().to_owned(),
        ctx.root_id().to_string(),
        ctx.parent_id().map(ToString::to_string),
        ctx.attempt(),
        ctx.redelivered(),
    )
}

#[task]
pub async fn greet(name: String, times: u32, suffix: Option<String>) -> String {
    let mut text = vec![format!("hello {name}"); times as usize].join(", ");
    text.push_str(suffix.as_deref().unwrap_or(""));
    text
}

#[task]
pub async fn whoami(ms: u64) -> u32 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    std::process::id()
}

static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MOST: AtomicUsize = AtomicUsize::new(0);

async fn probe(ms: u64) -> usize {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MOST.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    MOST.load(Ordering::SeqCst)
}

/// Returns the most tasks seen running at once in this process (shared with `probe_b`).
#[task]
pub async fn probe_a(ms: u64) -> usize {
    probe(ms).await
}

#[task]
pub async fn probe_b(ms: u64) -> usize {
    probe(ms).await
}

// --- relays: tasks that call tasks -------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayError {
    Div(DivError),
    Downstream(String),
}

#[task]
pub async fn relay_div(ctx: Context, a: i64, b: i64) -> Result<i64, RelayError> {
    div::new(a, b)
        .call(&ctx)
        .await
        .map_err(|error| match error {
            CallError::Task(error) => RelayError::Div(error),
            other => RelayError::Downstream(other.to_string()),
        })
}

/// Sleeps, then reports the deadline its downstream call inherited.
#[task]
pub async fn relay_remaining(ctx: Context, sleep_first_ms: u64) -> Result<Option<u64>, String> {
    tokio::time::sleep(Duration::from_millis(sleep_first_ms)).await;
    remaining_ms::new()
        .call(&ctx)
        .await
        .map_err(|e| e.to_string())
}

/// Calls a slow task; with a short deadline inherited, the downstream call times out.
#[task]
pub async fn relay_slow(ctx: Context, ms: u64) -> Result<u64, String> {
    sleep_ms::new(ms)
        .call(&ctx)
        .await
        .map_err(|e| e.to_string())
}

/// (own trace id, downstream trace id, downstream parent id, own task id)
#[task]
pub async fn relay_trace(ctx: Context) -> Result<(String, String, Option<String>, String), String> {
    let (trace, _root, parent, _, _) = context_info::new()
        .call(&ctx)
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        ctx.trace_id().to_owned(),
        trace,
        parent,
        ctx.task_id().to_string(),
    ))
}

/// Calls `add` `n` times one after the other, through its own process when it serves `add`.
#[task]
pub async fn relay_sum(ctx: Context, n: i64) -> Result<i64, String> {
    let mut total = 0;
    for i in 0..n {
        total = add::new(total, i)
            .call(&ctx)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(total)
}

// --- resilience ---------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlakyError {
    NotYet { attempt: u32 },
    Fatal,
}

impl amqp_tasks::Retryable for FlakyError {
    fn is_retryable(&self) -> bool {
        matches!(self, FlakyError::NotYet { .. })
    }
}

fn append(path: &str, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the record file");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("append");
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Fails its first `failures` runs (counted in `<path>`, across attempts and processes), then
/// succeeds with the attempt number the worker gave it. Records `run,attempt,unix_ms` per run.
#[task(retries = 3, backoff = "300ms")]
pub async fn flaky(ctx: Context, path: String, failures: u32) -> Result<u32, FlakyError> {
    let runs = std::fs::read_to_string(&path)
        .map(|t| t.lines().count())
        .unwrap_or(0) as u32
        + 1;
    append(&path, &format!("{runs},{},{}", ctx.attempt(), now_ms()));
    if runs <= failures {
        Err(FlakyError::NotYet {
            attempt: ctx.attempt(),
        })
    } else {
        Ok(ctx.attempt())
    }
}

/// Never worth retrying, although the task asks for retries.
#[task(retries = 3, backoff = "100ms")]
pub async fn fatal(path: String) -> Result<(), FlakyError> {
    append(&path, "ran");
    Err(FlakyError::Fatal)
}

/// Appends `n` to the file at `path`.
#[task]
pub async fn record(path: String, n: u64) {
    append(&path, &n.to_string());
}

/// Kills the process running it, every time: nothing `catch_unwind` could see.
#[task]
pub async fn poison(path: String) {
    append(&path, &std::process::id().to_string());
    std::process::abort();
}

// --- delivery, time limits, retries of panics ---------------------------------------------------

/// Appends `<pid> <attempt> <redelivered>` to `<path>` as it starts, waits `ms`, then appends its
/// pid to `<path>.done`.
#[task(timeout = "30s")]
pub async fn note_delivery(ctx: Context, path: String, ms: u64) -> u32 {
    append(
        &path,
        &format!(
            "{} {} {}",
            std::process::id(),
            ctx.attempt(),
            ctx.redelivered()
        ),
    );
    tokio::time::sleep(Duration::from_millis(ms)).await;
    append(&format!("{path}.done"), &std::process::id().to_string());
    std::process::id()
}

/// Writes `<path>` when dropped: proof that a handler's future was dropped (cancelled).
struct DropMarker(String);

impl Drop for DropMarker {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "dropped");
    }
}

/// Runs past its 300 ms time limit: waits `ms`, then writes `<path>.late`. Its future writes
/// `<path>.dropped` when it is dropped.
#[task(timeout = "300ms")]
pub async fn overrun_write(path: String, ms: u64) {
    let _dropped = DropMarker(format!("{path}.dropped"));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let _ = std::fs::write(format!("{path}.late"), "ran past its time limit");
}

/// Panics on its first run (counted in `<path>`), then returns the number of runs.
#[task(retries = 2, backoff = "100ms", retry_on_panic = true)]
pub async fn panics_once(path: String) -> u32 {
    let runs = std::fs::read_to_string(&path)
        .map(|t| t.lines().count())
        .unwrap_or(0) as u32
        + 1;
    append(&path, &runs.to_string());
    if runs == 1 {
        panic!("the first run panics");
    }
    runs
}

// --- signatures ----------------------------------------------------------------------------------

/// An alias: the signature is taken from the types as written (`Meters`), where earlier releases
/// took `type_name`'s (`u32`).
pub type Meters = u32;

#[task]
pub async fn walk(distance: Meters) -> Meters {
    distance * 2
}

// --- hostile input ---------------------------------------------------------------------------------

/// A value whose `Deserialize` panics.
#[derive(Debug, Serialize)]
pub struct Explosive(pub u8);

impl<'de> Deserialize<'de> for Explosive {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("Explosive cannot be decoded")
    }
}

#[task]
pub async fn explode_on_decode(value: Explosive) -> u8 {
    value.0
}

/// A value whose `Serialize` panics.
#[derive(Debug, Deserialize)]
pub struct Fragile;

impl Serialize for Fragile {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("Fragile cannot be encoded")
    }
}

#[task]
pub async fn explode_on_encode() -> Fragile {
    Fragile
}

/// An error whose `Display` panics.
#[derive(Debug, Serialize, Deserialize)]
pub struct Unprintable;

impl std::fmt::Display for Unprintable {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("Unprintable cannot be shown")
    }
}

#[task]
pub async fn explode_on_display() -> Result<(), Unprintable> {
    Err(Unprintable)
}

/// Panics when dropped.
struct Tripwire;

impl Drop for Tripwire {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("Tripwire dropped");
        }
    }
}

/// Holds a guard whose `Drop` panics, past its 200 ms time limit.
#[task(timeout = "200ms")]
pub async fn explode_on_cancel() {
    let _tripwire = Tripwire;
    tokio::time::sleep(Duration::from_secs(5)).await;
}

/// Two tasks sharing one queue, which workers may serve in part.
#[task(queue = "text")]
pub async fn shout(text: String) -> String {
    text.to_uppercase()
}

#[task(queue = "text")]
pub async fn word_count(text: String) -> usize {
    text.split_whitespace().count()
}

/// Asks for many long retries: its calls' deadline is far beyond what an expiration can say.
#[task(retries = 23, backoff = "1h")]
pub async fn patient() -> Result<u32, String> {
    Ok(7)
}

/// Appends `start <id> <unix ms>` as it starts and `end <id> <unix ms>` as it ends (after `ms`).
#[task(timeout = "30s")]
pub async fn span(ctx: Context, path: String, ms: u64) {
    append(&path, &format!("start {} {}", ctx.task_id(), now_ms()));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    append(&path, &format!("end {} {}", ctx.task_id(), now_ms()));
}

/// A task of the `mixed` queue that kills its worker.
#[task(queue = "mixed")]
pub async fn mixed_poison(path: String) {
    append(&path, &format!("poison {}", std::process::id()));
    std::process::abort();
}

/// An innocent task of the `mixed` queue: records `n`.
#[task(queue = "mixed")]
pub async fn mixed_innocent(path: String, n: u64, ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    append(&path, &n.to_string());
}

/// Gives up waiting on a slow call after 200 ms (its future dropped), then keeps its slot busy
/// for `ms`, recording `busy <start> <end>`.
#[task(timeout = "30s")]
pub async fn abandon_call(ctx: Context, path: String, ms: u64) {
    let slow = sleep_ms::new(5_000).call(&ctx);
    let _ = tokio::time::timeout(Duration::from_millis(200), slow).await;
    let start = now_ms();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    append(&path, &format!("busy {start} {}", now_ms()));
}

/// Records `probe <start> <end>` after running `ms`.
#[task(timeout = "30s")]
pub async fn busy_probe(path: String, ms: u64) {
    let start = now_ms();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    append(&path, &format!("probe {start} {}", now_ms()));
}

/// Appends `start <id> <unix ms>`, waits until the file `release` exists (at most a minute), then
/// appends `end <id> <unix ms>`.
#[task(timeout = "90s")]
pub async fn hold(ctx: Context, path: String, release: String) {
    append(&path, &format!("start {} {}", ctx.task_id(), now_ms()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&release).is_err() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    append(&path, &format!("end {} {}", ctx.task_id(), now_ms()));
}

/// Appends `n <unix ms>` to the file at `path`.
#[task]
pub async fn record_at(path: String, n: u64) {
    append(&path, &format!("{n} {}", now_ms()));
}

/// The greeting a worker is given as its state (`TEST_WORKER_GREETING`, default `hello, `).
#[derive(Debug)]
pub struct Greeting {
    /// Put before the name.
    pub prefix: String,
}

/// Greets with the worker's state.
#[task]
pub async fn greet_with(greeting: State<Greeting>, name: String) -> String {
    format!("{}{name}", greeting.prefix)
}

/// A task with a short time limit, to call with longer timeouts and countdowns.
#[task(timeout = "1s")]
pub async fn quick(x: u64) -> u64 {
    x
}

// --- results ------------------------------------------------------------------------------------

/// Fails its first attempt after `ms`, then succeeds after `ms` with the attempt number.
#[task(retries = 1, backoff = "1s")]
pub async fn fails_once(ctx: Context, ms: u64) -> Result<u32, FlakyError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    if ctx.attempt() == 1 {
        Err(FlakyError::NotYet { attempt: 1 })
    } else {
        Ok(ctx.attempt())
    }
}

/// Reports `count` progress updates, `ms` apart, then returns `count`.
#[task(timeout = "30s")]
pub async fn steps(ctx: Context, count: u32, ms: u64) -> u32 {
    for step in 1..=count {
        ctx.progress(
            step as f32 / count as f32,
            format!("step {step} of {count}"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    count
}

/// Adds, keeping nothing in a result store.
#[task(store_result = false)]
pub async fn add_unstored(a: i64, b: i64) -> i64 {
    a + b
}

/// A periodic task: every second, prints its tick id and when it ran (`beat tick <id> at <ms>`)
/// for `tests/tests/beat.rs`, which reads the workers' output. Only `--beat` workers send ticks.
#[task(every = "1s")]
pub async fn beat_tick(ctx: Context) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    println!("beat tick {} at {now}", ctx.task_id());
}
