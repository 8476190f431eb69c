//! Run with: cargo run --release -p amqp-tasks-bench --bin results-bench
//!
//! The cost of a result store: `.delay()` end-to-end throughput of `bench.sink` tasks with a worker
//! that has no store, one with Redis (`--results redis://…`) and one with PostgreSQL
//! (`--results postgres://…`), alternating in one run against the same broker. With a store, a
//! repetition ends only once every task's `Succeeded` record is in the store (counted through
//! the store's own completion notifications for Redis, a count of rows for PostgreSQL), not when
//! the handlers are done. See BENCHMARKS.md, "Result stores".

use amqp_tasks::Client;
use amqp_tasks_bench::tasks::{progress, sink};
use amqp_tasks_bench::{ROLE_ENV, Res, procs};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const REDIS: &str = "redis://127.0.0.1:6379/0";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
const LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    None,
    Redis,
    Postgres,
}

impl Store {
    fn url(self) -> Option<&'static str> {
        match self {
            Store::None => None,
            Store::Redis => Some(REDIS),
            Store::Postgres => Some(POSTGRES),
        }
    }
}

/// A worker process, and how many tasks it reported done.
struct Worker {
    child: Child,
    done: Arc<AtomicU64>,
}

impl Worker {
    fn start(url: &str, namespace: &str, store: Store) -> Res<Worker> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(ROLE_ENV, "worker")
            .env("AMQP_URL", url)
            .env("AMQP_TASKS_NAMESPACE", namespace)
            .env("AMQP_TASKS_CONCURRENCY", "64")
            .env("AMQP_TASKS_PREFETCH", "64")
            .env("AMQP_TASKS_TASKS", "bench.sink")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(results) = store.url() {
            command.env("AMQP_TASKS_RESULTS", results);
        }
        let mut child = command.spawn()?;
        let done = Arc::new(AtomicU64::new(0));
        let stdout = child.stdout.take().expect("piped");
        let counter = done.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(count) = progress::parse(&line) {
                    counter.store(count, Ordering::Relaxed);
                }
            }
        });
        Ok(Worker { child, done })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Counts the final states a store announces (Redis: `PSUBSCRIBE` through `redis-cli`).
struct RedisCounter {
    child: Child,
    count: Arc<AtomicU64>,
}

impl RedisCounter {
    async fn start(namespace: &str) -> Res<RedisCounter> {
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "psubscribe"])
            .arg(format!("{namespace}.amqp-tasks.done.*"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let count = Arc::new(AtomicU64::new(0));
        let subscribed = Arc::new(AtomicU64::new(0));
        let stdout = child.stdout.take().expect("piped");
        let (counter, ready) = (count.clone(), subscribed.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.trim() {
                    "pmessage" => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    "psubscribe" => ready.store(1, Ordering::Relaxed),
                    _ => {}
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while subscribed.load(Ordering::Relaxed) == 0 {
            if Instant::now() > deadline {
                return Err("redis-cli did not subscribe".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(RedisCounter { child, count })
    }
}

impl Drop for RedisCounter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn psql(sql: &str) -> Res<String> {
    let output = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-Atqc",
            sql,
        ])
        .output()?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned().into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Tasks per second from the first `.delay()` to the last task done (and stored).
async fn one(url: &str, store: Store, n: usize) -> Res<f64> {
    let namespace = format!(
        "bench-results.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let worker = Worker::start(url, &namespace, store)?;
    // The producer's store is only read, for the warm-up: `.delay()` writes nothing to it.
    let client = Client::builder(url)
        .namespace(namespace.clone())
        .results(store.url().unwrap_or_default())
        .connect()
        .await?;
    // Ready once its queue exists; a warm-up task, done (and stored) before the clock starts.
    let deadline = Instant::now() + LIMIT;
    let warm_up = loop {
        if let Ok(id) = sink::new(Vec::new()).delay(&client).await {
            break id;
        }
        if Instant::now() > deadline {
            return Err("the worker did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    while worker.done.load(Ordering::Relaxed) < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if store != Store::None {
        client.wait::<sink>(&warm_up, LIMIT).await?;
    }
    let table = format!("\"{namespace}.amqp_tasks_results\"");
    let counter = match store {
        Store::Redis => Some(RedisCounter::start(&namespace).await?),
        _ => None,
    };
    let payload = vec![7u8; 64];
    let started = Instant::now();
    let calls = (0..n).map(|_| sink::new(payload.clone()));
    for sent in client.delay_all(calls).await {
        sent?;
    }
    let target = n as u64 + 1;
    loop {
        let done = worker.done.load(Ordering::Relaxed) >= target;
        let stored = match store {
            Store::None => true,
            Store::Redis => counter
                .as_ref()
                .is_some_and(|c| c.count.load(Ordering::Relaxed) >= n as u64),
            Store::Postgres => {
                done && psql(&format!(
                    "SELECT count(*) FROM {table} WHERE state = 'succeeded'"
                ))?
                .parse::<u64>()?
                    >= target
            }
        };
        if done && stored {
            break;
        }
        if started.elapsed() > LIMIT {
            return Err(format!("{store:?}: not finished within {LIMIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    drop(worker);
    client.close().await;
    procs::clean_up(url, &namespace).await?;
    match store {
        Store::Redis => {
            let script = format!(
                "redis-cli --scan --pattern '{namespace}.amqp-tasks.*' | xargs -r -n 1000 redis-cli del >/dev/null"
            );
            Command::new("sh").args(["-c", &script]).status()?;
        }
        Store::Postgres => {
            psql(&format!("DROP TABLE IF EXISTS {table}"))?;
        }
        Store::None => {}
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn run(url: &str, n: usize, reps: usize) -> Res<()> {
    let stores = [Store::None, Store::Redis, Store::Postgres];
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); stores.len()];
    for rep in 0..reps {
        for (index, store) in stores.iter().enumerate() {
            let rate = one(url, *store, n).await?;
            println!("rep {rep} {store:?}: {rate:.0} tasks/s");
            figures[index].push(rate);
        }
    }
    let none = median(&mut figures[0].clone());
    for (index, store) in stores.iter().enumerate() {
        let values = &mut figures[index];
        let med = median(values);
        let (min, max) = (values[0], values[values.len() - 1]);
        println!(
            "RESULT scenario=delay-results store={} tasks_per_s={med:.0} min={min:.0} max={max:.0} ratio_to_none={:.2} n={n} reps={reps}",
            format!("{store:?}").to_lowercase(),
            med / none
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    if std::env::var(ROLE_ENV).as_deref() == Ok("worker") {
        return amqp_tasks::worker::main();
    }
    let mut args = std::env::args().skip(1);
    let n = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let reps = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| amqp_tasks::DEFAULT_URL.to_owned());
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    match runtime.block_on(run(&url, n, reps)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("results-bench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
