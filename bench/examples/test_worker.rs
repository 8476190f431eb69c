//! Run with: cargo run --release -p amqp-tasks-bench --example test_worker
//!
//! How fast a user's test suite runs tasks through `amqp_tasks::testing::TestWorker`
//! (in-process, no broker): sequential `.call()`s, 64 calls in flight, and `.delay()`s run by
//! `run_until_idle()`, of tasks that take a 64-byte body. Medians of 5.

use amqp_tasks::task;
use amqp_tasks::testing::TestWorker;
use futures_util::StreamExt;
use std::time::Instant;

const N: usize = 20_000;

#[task]
pub async fn echo(payload: Vec<u8>) -> u64 {
    payload.len() as u64
}

#[task]
pub async fn sink(payload: Vec<u8>) {
    std::hint::black_box(&payload);
}
const REPS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let test = TestWorker::new();
    let payload = vec![7u8; 64];
    let (mut sequential, mut in_flight, mut delayed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        let started = Instant::now();
        for _ in 0..N {
            echo::new(payload.clone())
                .call(&test)
                .await
                .expect("a call");
        }
        sequential.push(N as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        futures_util::stream::iter(0..N)
            .map(|_| echo::new(payload.clone()).call(&test))
            .buffer_unordered(64)
            .for_each(|answer| async move {
                answer.expect("a call");
            })
            .await;
        in_flight.push(N as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        for _ in 0..N {
            sink::new(payload.clone())
                .delay(&test)
                .await
                .expect("a delay");
        }
        assert_eq!(test.run_until_idle().await, N);
        delayed.push(N as f64 / started.elapsed().as_secs_f64());
    }
    println!(
        "TestWorker, {N} tasks × {REPS}: sequential calls {:.0}/s, 64 calls in flight {:.0}/s, \
         delays + run_until_idle {:.0}/s",
        median(sequential),
        median(in_flight),
        median(delayed)
    );
}
