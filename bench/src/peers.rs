//! The `peers` scenario: amqp-tasks and its peers — Celery 5 (Python), the Rust `celery` crate
//! 0.5 and aio-pika's `JsonRPC` (with `JsonMaster` for fire-and-forget) — on the same broker, one
//! after the other, interleaved over the repetitions, each with its guarantees stated beside its
//! figures.
//!
//! The peers are not built with the bench: on first use the scenario creates a Python virtual
//! environment under the target directory and installs the pinned packages from PyPI, and builds
//! `bench/peers` (a cargo project outside the workspace) into `target/peers`. A peer that cannot
//! be prepared (no `python3`, no network, a failed build) is skipped with the reason, and so is a
//! peer that fails while measured; the others go on.
//!
//! The peer protocol (`bench/peers/python/*.py`, `bench/peers/src/main.rs`): a **worker**
//! process prints `ready` once it consumes, then `done <count>` whenever tasks finished (the
//! bench's own progress lines); a **client** process prints `ready` once connected and then
//! answers commands read on stdin, one line each: `delay <n> <window>` → `sent <seconds>`,
//! `call <n> <in flight>` → `calls <seconds> <p50 µs> <p99 µs>` or `unsupported <why>`, `quit`;
//! `error <message>` when something failed.

use crate::chart::{Group, Panel};
use crate::procs::Memory;
use crate::scenarios::{Bench, Caller, Sides, load_average};
use crate::stats::{Stat, number, percentile_us};
use crate::tasks::progress;
use crate::{Error, Res};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// The Python packages the peers were written and checked against.
pub const PYTHON_PACKAGES: [&str; 6] = [
    "celery==5.7.0",
    "kombu==5.7.0",
    "amqp==5.4.2",
    "aio-pika==10.2.1",
    "aiormq==7.2.4",
    "pamqp==4.0.1",
];

/// A peer of the `peers` scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerKind {
    /// amqp-tasks itself (`.delay()`, `.call()`).
    #[value(name = "amqp-tasks")]
    AmqpTasks,
    /// The Rust `celery` crate 0.5.5 (fire-and-forget only: no result backend).
    #[value(name = "rust-celery")]
    RustCelery,
    /// aio-pika 10.2.1: `JsonRPC` calls, `JsonMaster` tasks.
    #[value(name = "aio-pika")]
    AioPika,
    /// Celery 5.7 (Python), `--pool threads`, result backend `rpc://`.
    #[value(name = "celery")]
    Celery,
}

/// What a peer promises, as measured here (its defaults, unless said otherwise).
#[derive(Clone, Copy, Debug)]
pub struct Guarantees {
    /// Does a send wait for the broker's publisher confirm?
    pub confirms: bool,
    /// Are fire-and-forget tasks persistent (`delivery_mode` 2)?
    pub persistent: bool,
    /// Does the worker ack a task after running it (at-least-once) or before (at-most-once)?
    pub ack_after_run: bool,
    /// The rest, for people.
    pub notes: &'static str,
}

impl PeerKind {
    /// Every peer, in the order they run in each repetition.
    pub const ALL: [PeerKind; 4] = [
        PeerKind::AmqpTasks,
        PeerKind::RustCelery,
        PeerKind::AioPika,
        PeerKind::Celery,
    ];

    /// The name in `RESULT` lines and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            PeerKind::AmqpTasks => "amqp-tasks",
            PeerKind::RustCelery => "rust-celery",
            PeerKind::AioPika => "aio-pika",
            PeerKind::Celery => "celery",
        }
    }

    /// The name for people.
    pub fn label(self) -> &'static str {
        match self {
            PeerKind::AmqpTasks => "amqp-tasks",
            PeerKind::RustCelery => "celery 0.5.5 (Rust)",
            PeerKind::AioPika => "aio-pika 10.2.1",
            PeerKind::Celery => "Celery 5.7 (Python)",
        }
    }

    /// The name and, in short, its guarantees (for the chart's legend).
    pub fn legend(self) -> String {
        let g = self.guarantees();
        format!(
            "{}: {}, ack {} run",
            self.label(),
            if g.confirms {
                "confirmed"
            } else {
                "no confirms"
            },
            if g.ack_after_run { "after" } else { "before" }
        )
    }

    /// What it promises in this run.
    pub fn guarantees(self) -> Guarantees {
        match self {
            PeerKind::AmqpTasks => Guarantees {
                confirms: true,
                persistent: true,
                ack_after_run: true,
                notes: "`.delay()` persistent, `.call()` transient with expiration; every publish \
                        confirmed; acked after the handler ran (and after its reply was \
                        published); concurrency 64, prefetch 64",
            },
            PeerKind::RustCelery => Guarantees {
                confirms: false,
                persistent: true,
                ack_after_run: false,
                notes: "persistent messages, no publisher confirms, acked before the task runs \
                        (acks_late off, its default); no result backend, so no calls; \
                        prefetch 64",
            },
            PeerKind::AioPika => Guarantees {
                confirms: true,
                persistent: true,
                ack_after_run: true,
                notes: "channels with publisher confirms (its default); JsonMaster tasks \
                        persistent, JsonRPC calls transient; acked after running (JsonRPC: after \
                        publishing the reply); prefetch 64",
            },
            PeerKind::Celery => Guarantees {
                confirms: false,
                persistent: true,
                ack_after_run: false,
                notes: "persistent messages, no publisher confirms (confirm_publish off), acked \
                        before the task runs (acks_late off), its defaults; `--pool threads \
                        --concurrency 64 --prefetch-multiplier 1`; results through `rpc://`; \
                        `.delay()` publishes synchronously, one after the other",
            },
        }
    }
}

/// The queues and exchanges the peers may leave in `namespace` (what is auto-delete or
/// exclusive goes away with its connection).
pub fn created_names(namespace: &str) -> (Vec<String>, Vec<String>) {
    let queues = vec![
        format!("{namespace}.celery"),
        format!("{namespace}.rust-celery"),
        format!("{namespace}.aio-pika.sink"),
        format!("{namespace}.aio-pika.echo"),
    ];
    let exchanges = vec![format!("{namespace}.celery")];
    (queues, exchanges)
}

/// One peer's figures (or why it has none).
#[derive(Clone, Debug)]
pub struct PeerRow {
    /// Who.
    pub kind: PeerKind,
    /// Fire-and-forget, end to end, tasks/s.
    pub delay: Stat,
    /// Sequential calls, p50 µs.
    pub call1_p50: Stat,
    /// 64 calls in flight, calls/s.
    pub call64: Stat,
    /// 64 calls in flight, p50 µs.
    pub call64_p50: Stat,
    /// Worker RSS once it was ready, MiB.
    pub rss_idle: Option<f64>,
    /// Worker RSS after every repetition, MiB.
    pub rss_after: Option<f64>,
    /// Worker peak RSS, MiB.
    pub rss_peak: Option<f64>,
    /// Why some figures are missing: skipped, failed, or cannot do calls.
    pub note: Option<String>,
    /// Skipped or failed (as opposed to measured, perhaps partly).
    pub status: &'static str,
    /// N of each measurement and the repetitions.
    pub counts: Counts,
}

/// How many tasks or calls each measurement makes, and how often.
#[derive(Clone, Copy, Debug)]
pub struct Counts {
    /// Fire-and-forget tasks per repetition.
    pub delay: usize,
    /// Sequential calls per repetition.
    pub call1: usize,
    /// Calls (64 in flight) per repetition.
    pub call64: usize,
    /// Repetitions.
    pub reps: usize,
}

fn stat_fields(line: &mut String, key: &str, stat: &Stat) {
    use std::fmt::Write as _;
    if stat.count == 0 {
        let _ = write!(line, " {key}=NaN");
    } else if stat.count == 1 {
        let _ = write!(line, " {key}={}", number(stat.median));
    } else {
        let _ = write!(
            line,
            " {key}={} {key}_min={} {key}_max={}",
            number(stat.median),
            number(stat.min),
            number(stat.max)
        );
    }
}

impl PeerRow {
    /// The machine-readable line.
    pub fn result_line(&self) -> String {
        use std::fmt::Write as _;
        let g = self.kind.guarantees();
        let mut line = format!("RESULT scenario=peers peer={}", self.kind.key());
        stat_fields(&mut line, "delay_tasks_per_s", &self.delay);
        stat_fields(&mut line, "call1_p50_us", &self.call1_p50);
        stat_fields(&mut line, "call64_calls_per_s", &self.call64);
        stat_fields(&mut line, "call64_p50_us", &self.call64_p50);
        let mib = |value: Option<f64>| value.map_or_else(|| "NaN".into(), |v| format!("{v:.1}"));
        let _ = write!(
            line,
            " worker_rss_idle_mib={} worker_rss_after_mib={} worker_rss_peak_mib={} \
             confirms={} persistent={} ack={} n_delay={} n_call1={} n_call64={} reps={} status={}",
            mib(self.rss_idle),
            mib(self.rss_after),
            mib(self.rss_peak),
            g.confirms,
            g.persistent,
            if g.ack_after_run {
                "after_run"
            } else {
                "before_run"
            },
            self.counts.delay,
            self.counts.call1,
            self.counts.call64,
            self.counts.reps,
            self.status
        );
        line
    }
}

/// The peers table, in Markdown.
pub fn table(rows: &[PeerRow]) -> String {
    let mut out = String::from(
        "| peer | confirms | persistent | ack | fire-and-forget, tasks/s | sequential call p50, µs | calls/s, 64 in flight | worker RSS idle → after, MiB |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let g = row.kind.guarantees();
        let rss = match (row.rss_idle, row.rss_after) {
            (Some(idle), Some(after)) => format!("{idle:.1} → {after:.1}"),
            (Some(idle), None) => format!("{idle:.1}"),
            _ => "–".into(),
        };
        let yes = |b: bool| if b { "yes" } else { "no" };
        out.push_str(&format!(
            "| {}{} | {} | {} | {} | {} | {} | {} | {rss} |\n",
            row.kind.label(),
            row.note
                .as_ref()
                .map_or_else(String::new, |note| format!(" ({note})")),
            yes(g.confirms),
            yes(g.persistent),
            if g.ack_after_run {
                "after running"
            } else {
                "before running"
            },
            row.delay.show(0),
            row.call1_p50.show(0),
            row.call64.show(0),
        ));
    }
    out
}

/// The chart groups of the peers: one bar per peer in each.
pub fn chart_groups(rows: &[PeerRow]) -> Vec<Group> {
    let mib = |value: Option<f64>| value.map_or_else(Stat::default, |v| Stat::of(&[v]));
    vec![
        Group {
            panel: Panel::Throughput,
            label: "fire-and-forget, end to end".into(),
            values: rows.iter().map(|r| r.delay).collect(),
        },
        Group {
            panel: Panel::Throughput,
            label: "calls, 64 in flight".into(),
            values: rows.iter().map(|r| r.call64).collect(),
        },
        Group {
            panel: Panel::Latency,
            label: "sequential call p50".into(),
            values: rows.iter().map(|r| r.call1_p50).collect(),
        },
        Group {
            panel: Panel::Memory,
            label: "worker RSS idle".into(),
            values: rows.iter().map(|r| mib(r.rss_idle)).collect(),
        },
        Group {
            panel: Panel::Memory,
            label: "worker RSS after the run".into(),
            values: rows.iter().map(|r| mib(r.rss_after)).collect(),
        },
    ]
}

// ------------------------------------------------------------------------------------------------
// Preparing the peers

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn python_dir() -> PathBuf {
    workspace_root().join("bench/peers/python")
}

fn run_quietly(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    Err(format!(
        "{command:?} failed ({}):\n{}",
        output.status,
        lines[lines.len().saturating_sub(15)..].join("\n")
    ))
}

/// The interpreter of the peers' virtual environment, created and filled from PyPI on first use.
fn prepare_python() -> Result<PathBuf, String> {
    let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let found = Command::new(&system)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        return Err(format!(
            "`{system}` was not found (install python3 with its venv module, or set PYTHON)"
        ));
    }
    let venv = target_dir().join("peers-venv");
    let interpreter = venv.join("bin/python");
    let marker = venv.join("amqp-tasks-bench-installed");
    let wanted = PYTHON_PACKAGES.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|installed| installed == wanted) {
        println!("peers: Python peers from {}", venv.display());
        return Ok(interpreter);
    }
    println!(
        "peers: creating a Python virtual environment in {} and installing {} from PyPI",
        venv.display(),
        PYTHON_PACKAGES.join(" ")
    );
    let _ = std::fs::remove_dir_all(&venv);
    run_quietly(Command::new(&system).arg("-m").arg("venv").arg(&venv))?;
    run_quietly(
        Command::new(&interpreter)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--timeout",
                "30",
            ])
            .args(PYTHON_PACKAGES),
    )
    .map_err(|e| format!("cannot install the Python peers (no network to PyPI?): {e}"))?;
    std::fs::write(&marker, wanted).map_err(|e| format!("write {}: {e}", marker.display()))?;
    Ok(interpreter)
}

/// The Rust `celery` peer's binary, built (release) in `bench/peers` into `target/peers`.
fn build_rust_celery() -> Result<PathBuf, String> {
    let target = target_dir().join("peers");
    let manifest = workspace_root().join("bench/peers/Cargo.toml");
    println!(
        "peers: building the Rust celery peer (cargo build --release --manifest-path {} into {}; \
         the first build takes a few minutes)",
        manifest.display(),
        target.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    run_quietly(
        Command::new(cargo)
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", &target),
    )
    .map_err(|e| format!("cannot build the Rust celery peer (no network to crates.io?): {e}"))?;
    Ok(target.join("release/rust-celery-peer"))
}

// ------------------------------------------------------------------------------------------------
// Peer processes

/// What a peer process's stdout reader tells the driver.
#[derive(Default)]
struct Board {
    done: AtomicU64,
    exited: AtomicBool,
    wake: Notify,
}

/// A worker or client process of a peer, speaking the peer protocol.
struct PeerProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    board: Arc<Board>,
    lines: mpsc::UnboundedReceiver<String>,
    log: PathBuf,
}

impl PeerProcess {
    fn spawn(name: &str, mut command: Command, log_dir: &Path) -> Res<PeerProcess> {
        let log = log_dir.join(format!(
            "{}-{}.log",
            name.replace(' ', "-"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {name} ({command:?}): {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let board = Arc::new(Board::default());
        let (sender, lines) = mpsc::unbounded_channel();
        let reader = board.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(count) = progress::parse(&line) {
                    reader.done.store(count, Ordering::Relaxed);
                    reader.wake.notify_one();
                } else {
                    let _ = sender.send(line);
                }
            }
            reader.exited.store(true, Ordering::Relaxed);
            reader.wake.notify_one();
        });
        Ok(PeerProcess {
            name: name.to_owned(),
            child,
            stdin,
            board,
            lines,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {}\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// The next protocol line (progress lines aside).
    async fn line(&mut self, limit: Duration) -> Res<String> {
        match tokio::time::timeout(limit, self.lines.recv()).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(format!("{} exited; its log:\n{}", self.name, self.log_tail()).into()),
            Err(_) => Err(format!("{} said nothing within {limit:?}", self.name).into()),
        }
    }

    /// Waits for `ready` (other lines, such as Celery's banner, are skipped).
    async fn wait_ready(&mut self, limit: Duration) -> Res<()> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.line(left).await?.trim() == "ready" {
                return Ok(());
            }
        }
    }

    /// Sends a command and returns its answer; `error …` is an error.
    async fn command(&mut self, command: &str, limit: Duration) -> Res<String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("{}: cannot send `{command}`: {e}", self.name))?;
        let answer = self.line(limit).await?;
        match answer.strip_prefix("error ") {
            Some(error) => Err(format!("{} answered `{command}` with: {error}", self.name).into()),
            None => Ok(answer),
        }
    }

    fn done(&self) -> u64 {
        self.board.done.load(Ordering::Relaxed)
    }

    /// Waits (woken by progress lines) until `target` tasks are done.
    async fn wait_done(&self, target: u64, limit: Duration) -> Res<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.done() >= target {
                return Ok(());
            }
            if self.board.exited.load(Ordering::Relaxed) {
                return Err(format!("{} exited; its log:\n{}", self.name, self.log_tail()).into());
            }
            if tokio::time::timeout_at(deadline, self.board.wake.notified())
                .await
                .is_err()
            {
                return Err(format!(
                    "{} finished {} of {target} tasks within {limit:?}",
                    self.name,
                    self.done()
                )
                .into());
            }
        }
    }

    /// `quit` on stdin (clients), SIGTERM, up to 10 s, then SIGKILL.
    fn stop(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut termed = false;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => {
                    if !termed && deadline - std::time::Instant::now() < Duration::from_secs(9) {
                        let _ = Command::new("kill")
                            .args(["-TERM", &self.child.id().to_string()])
                            .status();
                        termed = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        // On an error path: nothing of ours keeps running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `queue` exists and has a consumer.
async fn wait_consumer(url: &str, queue: &str, limit: Duration) -> Res<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let deadline = Instant::now() + limit;
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
        if let Ok(declared) = &declared {
            let _ = channel.close(200, "probe".into()).await;
            if declared.consumer_count() >= 1 {
                break Ok(());
            }
        }
        if Instant::now() >= deadline {
            break Err(format!("nobody consumes `{queue}` within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = connection.close(200, "ready".into()).await;
    result
}

/// A peer while it runs.
enum Running {
    /// amqp-tasks: a worker process and this process's client.
    Framework(Sides),
    /// A worker and a client process.
    Processes {
        worker: PeerProcess,
        client: PeerProcess,
    },
}

impl Running {
    fn worker_memory(&self) -> Memory {
        match self {
            Running::Framework(sides) => sides.framework_memory(),
            Running::Processes { worker, .. } => Memory::of(worker.pid()),
        }
    }

    async fn stop(self) -> Res<()> {
        match self {
            Running::Framework(sides) => sides.close().await,
            Running::Processes { worker, client } => {
                client.stop();
                worker.stop();
                Ok(())
            }
        }
    }
}

/// One peer: how it is started, and its figures so far.
struct Peer {
    kind: PeerKind,
    running: Option<Running>,
    delay: Vec<f64>,
    call1_p50: Vec<f64>,
    call64: Vec<f64>,
    call64_p50: Vec<f64>,
    rss_idle: Option<f64>,
    note: Option<String>,
    status: &'static str,
    calls_supported: bool,
}

const MIB: f64 = 1024.0;

impl Bench {
    /// The `peers` scenario.
    pub(crate) async fn peers(&self) -> Res<Vec<PeerRow>> {
        let counts = Counts {
            delay: self.n(10_000, 200),
            call1: (self.n(10_000, 200) / 10).max(1),
            call64: (self.n(10_000, 200) / 2).max(64),
            reps: self.reps(),
        };
        println!(
            "peers: {} fire-and-forget tasks, {} sequential calls and {} calls with 64 in flight \
             per repetition and peer; {} repetition(s)",
            counts.delay, counts.call1, counts.call64, counts.reps
        );
        let kinds = self.options.peers.clone();
        let needs_python = kinds
            .iter()
            .any(|k| matches!(k, PeerKind::Celery | PeerKind::AioPika));
        let python = if needs_python {
            Some(
                tokio::task::spawn_blocking(prepare_python)
                    .await
                    .map_err(|e| format!("preparing Python: {e}"))?,
            )
        } else {
            None
        };
        let rust_celery = if kinds.contains(&PeerKind::RustCelery) {
            Some(
                tokio::task::spawn_blocking(build_rust_celery)
                    .await
                    .map_err(|e| format!("building the Rust celery peer: {e}"))?,
            )
        } else {
            None
        };
        let mut peers: Vec<Peer> = Vec::new();
        for &kind in &kinds {
            let mut peer = Peer {
                kind,
                running: None,
                delay: Vec::new(),
                call1_p50: Vec::new(),
                call64: Vec::new(),
                call64_p50: Vec::new(),
                rss_idle: None,
                note: None,
                status: "ok",
                calls_supported: true,
            };
            let prepared = match kind {
                PeerKind::AmqpTasks => Ok(None),
                PeerKind::Celery | PeerKind::AioPika => python
                    .clone()
                    .expect("prepared for a Python peer")
                    .map(Some),
                PeerKind::RustCelery => rust_celery
                    .clone()
                    .expect("built for the Rust celery peer")
                    .map(Some),
            };
            match prepared {
                Err(reason) => {
                    println!("peers: SKIPPING {}: {reason}", kind.label());
                    peer.note = Some(format!("skipped: {}", first_line(&reason)));
                    peer.status = "skipped";
                }
                Ok(program) => {
                    println!("peers: starting {}", kind.label());
                    match self.start_peer(kind, program.as_deref()).await {
                        Ok(running) => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            peer.rss_idle = Some(running.worker_memory().rss_kib as f64 / MIB);
                            peer.running = Some(running);
                        }
                        Err(error) => {
                            println!("peers: SKIPPING {}: cannot start it: {error}", kind.label());
                            peer.note = Some(format!(
                                "failed to start: {}",
                                first_line(&error.to_string())
                            ));
                            peer.status = "failed";
                        }
                    }
                }
            }
            peers.push(peer);
        }
        let result = self.peer_rounds(&mut peers, counts).await;
        let mut rows = Vec::new();
        let mut errors = Vec::new();
        for mut peer in peers {
            let memory = peer.running.as_ref().map(Running::worker_memory);
            if let Some(running) = peer.running.take() {
                errors.extend(running.stop().await.err());
            }
            rows.push(PeerRow {
                kind: peer.kind,
                delay: Stat::of(&peer.delay),
                call1_p50: Stat::of(&peer.call1_p50),
                call64: Stat::of(&peer.call64),
                call64_p50: Stat::of(&peer.call64_p50),
                rss_idle: peer.rss_idle,
                rss_after: memory.map(|m| m.rss_kib as f64 / MIB),
                rss_peak: memory.map(|m| m.hwm_kib as f64 / MIB),
                note: peer.note,
                status: peer.status,
                counts,
            });
        }
        result?;
        if let Some(error) = errors.first() {
            return Err(format!("stopping the peers: {error}").into());
        }
        println!("\nwhat each peer guarantees here:");
        for peer in &rows {
            println!("  {}: {}", peer.kind.label(), peer.kind.guarantees().notes);
        }
        Ok(rows)
    }

    async fn start_peer(&self, kind: PeerKind, program: Option<&Path>) -> Res<Running> {
        let url = &self.config.url;
        let namespace = self.namespace();
        let limit = Duration::from_secs(60);
        let env = |command: &mut Command| {
            command
                .env("AMQP_URL", url)
                .env("PEER_NAMESPACE", namespace)
                .env("PEER_PREFETCH", self.options.prefetch.to_string());
        };
        let (worker, client, queue) = match kind {
            PeerKind::AmqpTasks => {
                let ready = [
                    self.sink_queue(crate::procs::Side::Framework),
                    self.echo_queue(crate::procs::Side::Framework),
                ];
                let framework = self.start_framework(1, &ready).await?;
                return Ok(Running::Framework(Sides::framework_only(framework)));
            }
            PeerKind::RustCelery => {
                let program = program.expect("a binary");
                let mut worker = Command::new(program);
                worker.arg("worker");
                env(&mut worker);
                let mut client = Command::new(program);
                client.arg("client");
                env(&mut client);
                (worker, client, format!("{namespace}.rust-celery"))
            }
            PeerKind::AioPika => {
                let python = program.expect("an interpreter");
                let script = python_dir().join("aiopika_peer.py");
                let mut worker = Command::new(python);
                worker.arg("-u").arg(&script).arg("worker");
                env(&mut worker);
                let mut client = Command::new(python);
                client.arg("-u").arg(&script).arg("client");
                env(&mut client);
                (worker, client, format!("{namespace}.aio-pika.sink"))
            }
            PeerKind::Celery => {
                let python = program.expect("an interpreter");
                let queue = format!("{namespace}.celery");
                let mut worker = Command::new(python);
                worker
                    .args(["-u", "-m", "celery", "-A", "celery_peer", "worker"])
                    .args(["--pool", "threads", "--concurrency", "64"])
                    .args(["--prefetch-multiplier", "1"])
                    .args([
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                    ])
                    .args(["--loglevel", "WARNING", "-Q"])
                    .arg(&queue)
                    .current_dir(python_dir());
                env(&mut worker);
                let mut client = Command::new(python);
                client
                    .args(["-u", "celery_peer.py", "client"])
                    .current_dir(python_dir());
                env(&mut client);
                (worker, client, queue)
            }
        };
        let log_dir = &self.config.log_dir;
        let mut worker = PeerProcess::spawn(&format!("{} worker", kind.key()), worker, log_dir)?;
        worker.wait_ready(limit).await?;
        wait_consumer(url, &queue, limit).await?;
        let mut client = PeerProcess::spawn(&format!("{} client", kind.key()), client, log_dir)?;
        client.wait_ready(limit).await?;
        Ok(Running::Processes { worker, client })
    }

    /// Fire-and-forget: `n` tasks, until the worker ran them all; tasks/s.
    async fn peer_delay(&self, running: &mut Running, n: usize) -> Res<f64> {
        let limit = Duration::from_secs(60) + Duration::from_millis(2 * n as u64);
        match running {
            Running::Framework(sides) => Ok(self
                .one_delay_round(sides, crate::procs::Side::Framework, n)
                .await?
                .0),
            Running::Processes { worker, client } => {
                let target = worker.done() + n as u64;
                let start = Instant::now();
                let answer = client
                    .command(&format!("delay {n} {}", self.options.window), limit)
                    .await?;
                if !answer.starts_with("sent ") {
                    return Err(format!("unexpected answer to delay: {answer}").into());
                }
                worker.wait_done(target, limit).await?;
                Ok(n as f64 / start.elapsed().as_secs_f64())
            }
        }
    }

    /// Calls: (calls/s, p50 µs), or `None` when the peer cannot make calls.
    async fn peer_calls(
        &self,
        running: &mut Running,
        n: usize,
        in_flight: usize,
    ) -> Res<Option<(f64, f64)>> {
        let limit = Duration::from_secs(60) + Duration::from_millis(20 * n as u64);
        match running {
            Running::Framework(sides) => {
                let (rate, latencies, _) = self
                    .one_call_round(sides, Caller::Framework, in_flight, n)
                    .await?;
                Ok(Some((rate, percentile_us(&latencies, 50.0))))
            }
            Running::Processes { client, .. } => {
                let answer = client
                    .command(&format!("call {n} {in_flight}"), limit)
                    .await?;
                if answer.starts_with("unsupported") {
                    return Ok(None);
                }
                let words: Vec<&str> = answer.split_whitespace().collect();
                match words.as_slice() {
                    ["calls", seconds, p50, _p99] => {
                        let seconds: f64 = seconds.parse()?;
                        Ok(Some((n as f64 / seconds, p50.parse()?)))
                    }
                    _ => Err(format!("unexpected answer to call: {answer}").into()),
                }
            }
        }
    }

    /// A warm-up, then the repetitions: in each, every peer's fire-and-forget round, then every
    /// peer's sequential calls, then every peer's 64 in flight.
    async fn peer_rounds(&self, peers: &mut [Peer], counts: Counts) -> Res<()> {
        println!("peers: warm-up (not counted)");
        for peer in peers.iter_mut() {
            let Some(running) = peer.running.as_mut() else {
                continue;
            };
            let warm = async {
                self.peer_delay(running, (counts.delay / 5).max(1)).await?;
                let supported = self
                    .peer_calls(running, (counts.call1 / 5).max(1), 1)
                    .await?
                    .is_some();
                if supported {
                    self.peer_calls(running, (counts.call64 / 5).max(64), 64)
                        .await?;
                }
                Ok::<_, Error>(supported)
            };
            match warm.await {
                Ok(supported) => {
                    peer.calls_supported = supported;
                    if !supported {
                        peer.note = Some("no calls: no result backend in celery 0.5".into());
                    }
                }
                Err(error) => fail(peer, &error),
            }
        }
        for rep in 0..counts.reps {
            let mut line = format!("rep {} (load average {}):", rep + 1, load_average());
            for peer in peers.iter_mut() {
                let Some(running) = peer.running.as_mut() else {
                    continue;
                };
                match self.peer_delay(running, counts.delay).await {
                    Ok(rate) => {
                        peer.delay.push(rate);
                        line.push_str(&format!(
                            "\n  {:<20} fire-and-forget {rate:>6.0} tasks/s",
                            peer.kind.label()
                        ));
                    }
                    Err(error) => fail(peer, &error),
                }
            }
            for (n, in_flight) in [(counts.call1, 1), (counts.call64, 64)] {
                for peer in peers.iter_mut() {
                    if !peer.calls_supported {
                        continue;
                    }
                    let Some(running) = peer.running.as_mut() else {
                        continue;
                    };
                    match self.peer_calls(running, n, in_flight).await {
                        Ok(Some((rate, p50))) => {
                            if in_flight == 1 {
                                peer.call1_p50.push(p50);
                            } else {
                                peer.call64.push(rate);
                                peer.call64_p50.push(p50);
                            }
                            line.push_str(&format!(
                                "\n  {:<20} {in_flight:>2} in flight {rate:>6.0} calls/s p50 \
                                 {p50:.0} µs",
                                peer.kind.label()
                            ));
                        }
                        Ok(None) => peer.calls_supported = false,
                        Err(error) => fail(peer, &error),
                    }
                }
            }
            println!("{line}");
        }
        Ok(())
    }
}

/// A peer that failed while measured: says why, stops it, and the others go on.
fn fail(peer: &mut Peer, error: &Error) {
    println!(
        "peers: {} FAILED, left out from now on: {error}",
        peer.kind.label()
    );
    peer.note = Some(format!("failed: {}", first_line(&error.to_string())));
    peer.status = "failed";
    if let Some(running) = peer.running.take() {
        match running {
            Running::Processes { worker, client } => {
                client.stop();
                worker.stop();
            }
            Running::Framework(sides) => {
                // Dropping the worker group kills its process.
                drop(sides);
            }
        }
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}
