//! Worker processes (this binary started again in a worker role), their progress reports, their
//! memory, and the broker-side bookkeeping around them (readiness, clean-up).

use crate::tasks::progress;
use crate::{ROLE_ENV, Res};
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Which side a worker process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// `amqp_tasks::worker::main()` serving the bench tasks.
    Framework,
    /// The raw lapin consumer of [`crate::raw`].
    Raw,
    /// The raw lapin consumer acking in batches ([`crate::raw::AckMode::Batch`]).
    RawBatched,
}

impl Side {
    /// `framework` or `raw lapin`.
    pub fn label(self) -> &'static str {
        match self {
            Side::Framework => "amqp-tasks",
            Side::Raw => "raw lapin",
            Side::RawBatched => "raw batched",
        }
    }
}

/// How to start worker processes.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Broker URL.
    pub url: String,
    /// Queue namespace of this run.
    pub namespace: String,
    /// Framework worker `--concurrency`.
    pub concurrency: usize,
    /// Prefetch of both sides' consumers.
    pub prefetch: u16,
    /// How the raw worker runs deliveries.
    pub dispatch: crate::raw::Dispatch,
    /// What the raw side puts in messages.
    pub wire: crate::raw::Wire,
    /// Where worker logs go.
    pub log_dir: PathBuf,
}

/// What the reader threads of a group's processes report.
#[derive(Default)]
struct Board {
    counts: Vec<AtomicU64>,
    exited: AtomicBool,
    wake: Notify,
}

/// One or more worker processes of one side, consuming the same queue(s).
pub struct WorkerGroup {
    /// The side they serve.
    pub side: Side,
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    board: Arc<Board>,
}

impl WorkerGroup {
    /// Starts `count` worker processes of `side`.
    pub fn start(side: Side, count: usize, config: &WorkerConfig) -> Res<WorkerGroup> {
        let exe = std::env::current_exe()?;
        let board = Arc::new(Board {
            counts: (0..count).map(|_| AtomicU64::new(0)).collect(),
            ..Board::default()
        });
        let mut group = WorkerGroup {
            side,
            children: Vec::new(),
            logs: Vec::new(),
            board: board.clone(),
        };
        // AMQP_TASKS_BENCH_WRAP="valgrind --tool=callgrind" runs workers under a profiler.
        let wrap: Vec<String> = std::env::var("AMQP_TASKS_BENCH_WRAP")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for index in 0..count {
            let log = config.log_dir.join(format!(
                "{}-worker-{index}-{}.log",
                match side {
                    Side::Framework => "framework",
                    Side::Raw => "raw",
                    Side::RawBatched => "raw-batched",
                },
                uuid::Uuid::new_v4().simple()
            ));
            let mut command = match wrap.split_first() {
                Some((program, args)) => {
                    let mut command = Command::new(program);
                    command.args(args).arg(&exe);
                    command
                }
                None => Command::new(&exe),
            };
            command
                .env("AMQP_URL", &config.url)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or("info".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?);
            match side {
                Side::Framework => {
                    command
                        .env(ROLE_ENV, "worker")
                        .env("AMQP_TASKS_NAMESPACE", &config.namespace)
                        .env("AMQP_TASKS_CONCURRENCY", config.concurrency.to_string())
                        .env("AMQP_TASKS_PREFETCH", config.prefetch.to_string())
                        .env("AMQP_TASKS_GRACE", "10s");
                }
                Side::Raw | Side::RawBatched => {
                    let ack = if side == Side::RawBatched {
                        crate::raw::AckMode::Batch
                    } else {
                        crate::raw::AckMode::Acker
                    };
                    command
                        .env(ROLE_ENV, "raw-worker")
                        .env("AMQP_TASKS_BENCH_ACK", ack.as_str())
                        .env("AMQP_TASKS_BENCH_NAMESPACE", &config.namespace)
                        .env("AMQP_TASKS_BENCH_PREFETCH", config.prefetch.to_string())
                        .env("AMQP_TASKS_BENCH_DISPATCH", config.dispatch.as_str())
                        .env("AMQP_TASKS_BENCH_WIRE", config.wire.as_str());
                }
            }
            let mut child = command.spawn()?;
            let stdout = child.stdout.take().expect("piped stdout");
            let board = board.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(count) = progress::parse(&line) {
                        board.counts[index].store(count, Ordering::Relaxed);
                        board.wake.notify_one();
                    }
                }
                board.exited.store(true, Ordering::Relaxed);
                board.wake.notify_one();
            });
            group.children.push(child);
            group.logs.push(log);
        }
        Ok(group)
    }

    /// Process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Tasks finished so far, summed over the processes.
    pub fn total(&self) -> u64 {
        self.board
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Waits (woken by progress reports, no polling) until the processes finished `target` tasks
    /// in total.
    pub async fn wait_total(&self, target: u64, limit: Duration) -> Res<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.total() >= target {
                return Ok(());
            }
            if self.board.exited.load(Ordering::Relaxed) {
                return Err(format!(
                    "a {} worker exited early; its log:\n{}",
                    self.side.label(),
                    self.log_tails()
                )
                .into());
            }
            if tokio::time::timeout_at(deadline, self.board.wake.notified())
                .await
                .is_err()
            {
                return Err(format!(
                    "{} workers finished {} of {target} tasks within {limit:?}",
                    self.side.label(),
                    self.total()
                )
                .into());
            }
        }
    }

    /// Waits until `queue` has at least as many consumers as this group has processes.
    pub async fn wait_ready(&self, url: &str, queue: &str, limit: Duration) -> Res<()> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let deadline = Instant::now() + limit;
        let wanted = self.children.len() as u32;
        let result = loop {
            let channel = connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(queue) = &declared {
                let _ = channel.close(200, "probe".into()).await;
                if queue.consumer_count() >= wanted {
                    break Ok(());
                }
            }
            if self.board.exited.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break Err(format!(
                    "{} worker(s) not consuming `{queue}` within {limit:?}; log:\n{}",
                    self.side.label(),
                    self.log_tails()
                )
                .into());
            }
            // Before any measurement starts: polling is fine here.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = connection.close(200, "ready".into()).await;
        result
    }

    /// `VmRSS` and `VmHWM` of each process, in KiB.
    pub fn memory(&self) -> Vec<Memory> {
        self.pids().into_iter().map(Memory::of).collect()
    }

    fn log_tails(&self) -> String {
        self.logs
            .iter()
            .map(|log| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                format!("--- {}\n{tail}", log.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asks each process to stop (SIGTERM), waits up to 10 s, then kills what is left.
    pub fn stop(mut self) -> Res<()> {
        self.stop_children()
    }

    fn stop_children(&mut self) -> Res<()> {
        for child in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut failures = Vec::new();
        for child in &mut self.children {
            loop {
                match child.try_wait()? {
                    Some(status) => {
                        if !status.success() {
                            failures.push(format!("pid {} exited with {status}", child.id()));
                        }
                        break;
                    }
                    None if std::time::Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        failures.push(format!("pid {} did not stop within 10 s", child.id()));
                        break;
                    }
                    None => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.children.clear();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!("{} workers: {}", self.side.label(), failures.join("; ")).into())
        }
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        // On an error path: nothing of ours keeps running.
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process's resident memory, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
}

impl Memory {
    /// Reads `VmRSS` and `VmHWM` of `pid` (zeros where unreadable).
    pub fn of(pid: u32) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }
}

/// Every queue and exchange a run in `namespace` may have created.
pub fn created_names(namespace: &str) -> (Vec<String>, Vec<String>) {
    let mut queues = Vec::new();
    for task in ["bench.sink", "bench.echo"] {
        queues.push(format!("{namespace}.{task}"));
        queues.push(format!("{namespace}.{task}.dlq"));
    }
    queues.extend(
        amqp_tasks::topology::DELAY_BUCKETS_MS
            .iter()
            .map(|bucket| amqp_tasks::topology::delay_queue(Some(namespace), *bucket)),
    );
    queues.push(crate::raw::sink_queue(namespace));
    queues.push(crate::raw::echo_queue(namespace));
    queues.push(crate::raw::batched_queue(namespace));
    queues.push(amqp_tasks::topology::revocations_queue(Some(namespace)));
    let (peer_queues, peer_exchanges) = crate::peers::created_names(namespace);
    queues.extend(peer_queues);
    let mut exchanges = vec![
        amqp_tasks::topology::delay_exchange(Some(namespace)),
        amqp_tasks::topology::events_exchange(Some(namespace)),
        amqp_tasks::topology::control_exchange(Some(namespace)),
    ];
    exchanges.extend(peer_exchanges);
    (queues, exchanges)
}

/// Deletes every queue and exchange of `namespace` (what does not exist is skipped).
pub async fn clean_up(url: &str, namespace: &str) -> Res<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let (queues, exchanges) = created_names(namespace);
    let mut channel = connection.create_channel().await?;
    for queue in queues {
        if channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .is_err()
        {
            // A failed delete closes the channel: carry on with a new one.
            channel = connection.create_channel().await?;
        }
    }
    for exchange in exchanges {
        if channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .is_err()
        {
            channel = connection.create_channel().await?;
        }
    }
    let _ = connection.close(200, "cleaned up".into()).await;
    Ok(())
}
