//! The Rust `celery` crate (0.5) as a peer of amqp-tasks-bench: `rust-celery-peer worker` or
//! `rust-celery-peer client`, speaking the bench's peer protocol (see `bench/src/peers.rs`):
//!
//! - worker: consumes `<namespace>.rust-celery` and runs `bench.sink(payload)`; prints `ready`
//!   once it consumes, then `done <count>` as tasks finish (coalesced, no polling);
//! - client: prints `ready` once connected, then reads commands on stdin: `delay <n> <window>`
//!   sends n tasks with at most `window` sends in flight and prints `sent <seconds>`;
//!   `call <n> <in flight>` prints `unsupported …` (celery 0.5 has no result backend); `quit`.
//!
//! Environment: `AMQP_URL`, `PEER_NAMESPACE`, `PEER_PREFETCH`.
//!
//! What the crate does on the wire (0.5.5): durable queues, persistent messages
//! (`delivery_mode` 2), no publisher confirms (a send returns once lapin took the frames), and by
//! default (`acks_late = false`) the worker acks a task *before* running it.

// celery 0.5's task macro writes its impls inside a const block.
#![allow(non_local_definitions)]

use celery::prelude::*;
use futures::StreamExt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;

static DONE: AtomicU64 = AtomicU64::new(0);
static WAKE: Notify = Notify::const_new();

/// The fire-and-forget task: reads its payload and counts itself done.
#[celery::task(name = "bench.sink")]
async fn sink(payload: String) -> TaskResult<()> {
    std::hint::black_box(&payload);
    DONE.fetch_add(1, Ordering::Relaxed);
    WAKE.notify_one();
    Ok(())
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn queue() -> String {
    let namespace = std::env::var("PEER_NAMESPACE").unwrap_or_else(|_| "bench".into());
    format!("{namespace}.rust-celery")
}

async fn app() -> Result<std::sync::Arc<celery::Celery>, Error> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefetch: u16 = std::env::var("PEER_PREFETCH")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(64);
    let queue = queue();
    Ok(celery::app!(
        broker = AMQPBroker { url },
        tasks = [sink],
        task_routes = ["*" => &queue],
        default_queue = &queue,
        prefetch_count = prefetch,
        heartbeat = Some(10),
    )
    .await?)
}

/// Writes the count of finished tasks whenever it changes (wake-ups coalesce).
async fn report() {
    loop {
        WAKE.notified().await;
        let count = DONE.load(Ordering::Relaxed);
        let mut out = std::io::stdout().lock();
        if writeln!(out, "done {count}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

async fn worker() -> Result<(), Error> {
    let app = app().await?;
    tokio::spawn(report());
    let queue = queue();
    // Printed just before consuming starts (its future is not `Send`, so it runs here); the
    // driver also waits until the queue has its consumer.
    println!("ready");
    app.consume_from(&[queue.as_str()]).await?;
    app.close().await?;
    Ok(())
}

async fn client() -> Result<(), Error> {
    let app = app().await?;
    println!("ready");
    let payload = "x".repeat(64);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["delay", n, window] => {
                let (n, window): (usize, usize) = (n.parse()?, window.parse()?);
                let start = Instant::now();
                let sent = futures::stream::iter(0..n)
                    .map(|_| app.send_task(sink::new(payload.clone())))
                    .buffer_unordered(window.max(1))
                    .fold(Ok::<usize, String>(0), |count, sent| async move {
                        match (count, sent) {
                            (Ok(count), Ok(_)) => Ok(count + 1),
                            (Err(error), _) => Err(error),
                            (_, Err(error)) => Err(error.to_string()),
                        }
                    })
                    .await;
                match sent {
                    Ok(_) => println!("sent {:.6}", start.elapsed().as_secs_f64()),
                    Err(error) => println!("error {error}"),
                }
            }
            ["call", ..] => println!(
                "unsupported celery 0.5 has no result backend: tasks cannot return a value to \
                 their caller"
            ),
            ["quit"] => break,
            _ => println!("error unknown command `{line}`"),
        }
    }
    app.close().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let role = std::env::args().nth(1).unwrap_or_default();
    let result = match role.as_str() {
        "worker" => worker().await,
        "client" => client().await,
        _ => Err("usage: rust-celery-peer worker|client".into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rust-celery-peer {role}: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
