//! The tasks the framework side runs, and the progress counter both sides' workers report.

use amqp_tasks::task;

/// The `delay`, `memory` and `scale` task: reads its payload and counts itself done.
#[task(name = "bench.sink")]
pub async fn sink(payload: Vec<u8>) {
    std::hint::black_box(&payload);
    progress::done();
}

/// The `call-*` task: answers with the payload's length.
#[task(name = "bench.echo")]
pub async fn echo(payload: Vec<u8>) -> u64 {
    payload.len() as u64
}

/// How a worker process tells the driver how many tasks it finished, without the driver polling:
/// every finished task bumps a counter and wakes a reporter task, which writes the current count
/// to stdout as `done <count>` (wake-ups that arrive while it writes coalesce into one line).
pub mod progress {
    use std::io::Write;
    use std::sync::Once;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::Notify;

    /// The prefix of a progress line on a worker's stdout.
    pub const PREFIX: &str = "done ";

    static DONE: AtomicU64 = AtomicU64::new(0);
    static WAKE: Notify = Notify::const_new();
    static REPORTER: Once = Once::new();

    /// Counts one finished task; must be called inside a tokio runtime.
    pub fn done() {
        DONE.fetch_add(1, Ordering::Relaxed);
        REPORTER.call_once(|| {
            tokio::spawn(report());
        });
        WAKE.notify_one();
    }

    async fn report() {
        let stdout = std::io::stdout();
        loop {
            WAKE.notified().await;
            let count = DONE.load(Ordering::Relaxed);
            let mut out = stdout.lock();
            if writeln!(out, "{PREFIX}{count}")
                .and_then(|()| out.flush())
                .is_err()
            {
                // The driver is gone: nobody to report to.
                return;
            }
        }
    }

    /// Parses a progress line.
    pub fn parse(line: &str) -> Option<u64> {
        line.strip_prefix(PREFIX)?.trim().parse().ok()
    }
}
