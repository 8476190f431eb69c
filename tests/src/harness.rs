//! The test harness: a namespace per test on the shared broker (cleaned up on drop, even after a
//! panic), worker processes with captured logs, and raw lapin access for hand-made messages.

use amqp_tasks::{Client, DEFAULT_URL};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Every wait in the tests is bounded by this, so that nothing hangs CI.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Runs a test body with an overall time bound.
pub async fn bounded<F: Future>(limit: Duration, body: F) -> F::Output {
    match tokio::time::timeout(limit, body).await {
        Ok(output) => output,
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// Waits until `check` returns `Some`, polling, for at most `limit`.
pub async fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `attempt` resolves to `Some`, retrying, for at most [`PATIENCE`].
pub async fn eventually_async<T, F, Fut>(mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {PATIENCE:?} retrying");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A namespace of queues on the shared broker (or on a private node of the test's), deleted when
/// dropped.
pub struct TestEnv {
    pub namespace: String,
    queues: Mutex<Vec<String>>,
    pub dir: std::path::PathBuf,
    /// The broker's URL: the shared one, or the private node's.
    pub url: String,
    node: Option<std::sync::Arc<crate::node::Node>>,
}

impl TestEnv {
    /// A namespace on the shared broker.
    pub fn new(test: &str) -> TestEnv {
        TestEnv::create(test, amqp_url(), None)
    }

    /// A namespace on the broker(s) at `url` (a TLS node, a cluster's URL list): its workers and
    /// clients use that URL; nothing of it is inspected with `rabbitmqctl`.
    pub fn with_url(test: &str, url: String) -> TestEnv {
        TestEnv::create(test, url, None)
    }

    /// A namespace on a private node of the test's (which it inspects with its own
    /// `rabbitmqctl -n`).
    pub fn on_node(test: &str, node: std::sync::Arc<crate::node::Node>) -> TestEnv {
        TestEnv::create(test, node.amqp_url(), Some(node))
    }

    fn create(test: &str, url: String, node: Option<std::sync::Arc<crate::node::Node>>) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = format!("test.{test}.{}", &id[..8]);
        let dir = std::env::temp_dir().join(format!("amqp-tasks-{test}-{}", &id[..8]));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let queues = amqp_tasks::registry::tasks()
            .iter()
            .flat_map(|t| {
                let queue = format!("{namespace}.{}", t.queue());
                [
                    format!("{queue}.dlq"),
                    format!("{queue}.redelivered"),
                    queue,
                ]
            })
            .chain(
                amqp_tasks::topology::DELAY_BUCKETS_MS
                    .iter()
                    .flat_map(|bucket| {
                        [
                            amqp_tasks::QueueType::Classic,
                            amqp_tasks::QueueType::Quorum,
                        ]
                        .map(|kind| {
                            amqp_tasks::topology::delay_queue_of(Some(&namespace), *bucket, kind)
                        })
                    }),
            )
            .chain([amqp_tasks::topology::revocations_queue(Some(&namespace))])
            .collect();
        TestEnv {
            namespace,
            queues: Mutex::new(queues),
            dir,
            url,
            node,
        }
    }

    /// The broker-side name of a queue of this namespace.
    pub fn queue(&self, queue: &str) -> String {
        format!("{}.{queue}", self.namespace)
    }

    /// Deletes this queue (and its `.dlq` and redelivered lane) with the namespace.
    pub fn track(&self, queue: &str) {
        let mut queues = self.queues.lock().unwrap();
        queues.push(self.queue(queue));
        queues.push(format!("{}.dlq", self.queue(queue)));
        queues.push(format!("{}.redelivered", self.queue(queue)));
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    pub async fn client(&self) -> Client {
        Client::builder(self.url.clone())
            .namespace(self.namespace.clone())
            .connect()
            .await
            .expect("connect to RabbitMQ (is it running? see README)")
    }

    /// Starts a worker process of `binary` in this namespace.
    pub fn worker(&self, binary: &str, args: &[&str]) -> WorkerProcess {
        WorkerProcess::spawn(
            binary,
            args,
            &[
                ("AMQP_URL", &self.url),
                ("AMQP_TASKS_NAMESPACE", &self.namespace),
            ],
        )
    }

    /// [`worker`](Self::worker), with more environment variables.
    pub fn worker_with_env(
        &self,
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let mut all = vec![
            ("AMQP_URL", self.url.as_str()),
            ("AMQP_TASKS_NAMESPACE", self.namespace.as_str()),
        ];
        all.extend_from_slice(env);
        WorkerProcess::spawn(binary, args, &all)
    }

    /// Runs a command to completion in this namespace: (exit code, stdout, stderr).
    pub async fn run(&self, binary: &str, args: &[&str]) -> (i32, String, String) {
        run_command(
            binary,
            args,
            &[
                ("AMQP_URL", &self.url),
                ("AMQP_TASKS_NAMESPACE", &self.namespace),
            ],
        )
        .await
    }

    /// A raw lapin channel, for messages a Rust stub would never send.
    pub async fn raw(&self) -> Raw {
        let connection = tokio::time::timeout(
            PATIENCE,
            Connection::connect(&self.url, ConnectionProperties::default()),
        )
        .await
        .expect("connecting to RabbitMQ timed out")
        .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        Raw {
            _connection: connection,
            channel,
        }
    }

    /// The messages ready in a queue of this namespace (a passive declare: delivered but unacked
    /// messages are not counted; see [`TestEnv::counts`]). Fails the test if the queue does not
    /// exist: a missing queue is never an empty one.
    pub async fn depth(&self, queue: &str) -> u32 {
        let name = self.queue(queue);
        let raw = self.raw().await;
        let declared = tokio::time::timeout(
            PATIENCE,
            raw.channel.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("no answer to a passive declare of `{name}`"));
        match declared {
            Ok(queue) => queue.message_count(),
            Err(error) => panic!("queue `{name}` cannot be inspected (does it exist?): {error}"),
        }
    }

    /// What the broker counts in a queue of this namespace: ready and unacknowledged messages
    /// (through `rabbitmqctl`, which sees deliveries a consumer has not acked yet). Fails the
    /// test if the queue does not exist.
    pub async fn counts(&self, queue: &str) -> Counts {
        let name = self.queue(queue);
        let args = [
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ];
        let listing = match &self.node {
            Some(node) => node.rabbitmqctl(&args).await,
            None => rabbitmqctl(&args).await,
        };
        listing
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                match fields.as_slice() {
                    [queue, ready, unacked] if *queue == name => Some(Counts {
                        ready: ready.trim().parse().expect("messages_ready"),
                        unacked: unacked.trim().parse().expect("messages_unacknowledged"),
                    }),
                    _ => None,
                }
            })
            .unwrap_or_else(|| panic!("queue `{name}` is not on the broker:\n{listing}"))
    }

    /// Waits until every message of a queue of this namespace has been acked: nothing ready,
    /// nothing delivered and unacknowledged. A worker publishes a dead letter (and waits for its
    /// confirm) before it acks the original, so once the task queue is settled, its `.dlq`
    /// holds every dead letter the worker will write for it.
    pub async fn settled(&self, queue: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let counts = self.counts(queue).await;
            if counts == (Counts::default()) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "queue `{}` did not settle within {PATIENCE:?}: {counts:?}",
                    self.queue(queue)
                );
            }
            // Each look is a `rabbitmqctl` (an Erlang VM): not too often.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A queue's messages as the broker counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting to be delivered.
    pub ready: u32,
    /// Delivered to a consumer and not acked yet.
    pub unacked: u32,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        let exchanges = [
            amqp_tasks::QueueType::Classic,
            amqp_tasks::QueueType::Quorum,
        ]
        .map(|kind| amqp_tasks::topology::delay_exchange_of(Some(&self.namespace), kind))
        .into_iter()
        .chain([
            amqp_tasks::topology::events_exchange(Some(&self.namespace)),
            amqp_tasks::topology::control_exchange(Some(&self.namespace)),
        ]);
        let url = self.url.clone();
        let _ = std::fs::remove_dir_all(&self.dir);
        // A runtime of its own (the test's may be gone, or panicking), and a bound on the wait:
        // a broker that does not answer must not hang the test binary.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    let cleanup = async {
                        let connection = Connection::connect(&url, ConnectionProperties::default())
                            .await
                            .ok()?;
                        let channel = connection.create_channel().await.ok()?;
                        for queue in queues {
                            let _ = channel
                                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                                .await;
                        }
                        for exchange in exchanges {
                            let _ = channel
                                .exchange_delete(
                                    exchange.as_str().into(),
                                    lapin::options::ExchangeDeleteOptions::default(),
                                )
                                .await;
                        }
                        let _ = connection.close(200, "test cleanup".into()).await;
                        Some(())
                    };
                    let _ = tokio::time::timeout(PATIENCE, cleanup).await;
                });
            }
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(PATIENCE + Duration::from_secs(5));
    }
}

/// Raw access to the broker.
pub struct Raw {
    _connection: Connection,
    pub channel: Channel,
}

impl Raw {
    /// An exclusive reply queue of its own; returns its name.
    pub async fn reply_queue(&self) -> String {
        let name = format!("test-replies-{}", uuid::Uuid::new_v4().simple());
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare reply queue");
        name
    }

    /// Waits for one message on `queue` (basic.get, polled) and acks it.
    pub async fn get(&self, queue: &str, limit: Duration) -> lapin::message::Delivery {
        let deadline = Instant::now() + limit;
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if let Some(message) = got {
                return message.delivery;
            }
            if Instant::now() >= deadline {
                panic!("no message on `{queue}` within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A worker running as a child process, its stderr captured line by line.
pub struct WorkerProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// How many of its two output streams have closed.
    closed: Arc<AtomicUsize>,
}

impl WorkerProcess {
    pub fn spawn(binary: &str, args: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
        let mut command = Command::new(binary);
        command
            .args(args)
            .env("RUST_LOG", "info,amqp_tasks=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        for stream in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (lines, closed) = (lines.clone(), closed.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
        WorkerProcess {
            child,
            lines,
            closed,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a line containing `needle`; fails at once if the worker exits without it.
    pub async fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            if self.closed.load(Ordering::SeqCst) == 2 {
                panic!(
                    "the worker exited before printing `{needle}`:\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for `{needle}` from the worker:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until it consumes its queues.
    pub async fn ready(self) -> WorkerProcess {
        self.wait_for("worker ready").await;
        self
    }

    /// True once the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let output = run_blocking(
            Command::new("kill").args(["-s", signal, &self.child.id().to_string()]),
            Duration::from_secs(5),
        );
        assert!(output.status.success(), "kill -s {signal} failed");
    }

    /// Waits for it to exit, for at most `limit`.
    pub async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let drained = self.closed.clone();
                eventually("the worker's output to close", PATIENCE, || {
                    (drained.load(Ordering::SeqCst) == 2).then_some(())
                })
                .await;
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the worker did not exit within {limit:?}:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `rabbitmqctl` against the shared node (the tests that inspect or act on the broker need
/// it, as root), bounded in time; returns its stdout and fails the test if it fails.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let (code, stdout, stderr) = run_command("rabbitmqctl", args, &[]).await;
    assert_eq!(code, 0, "rabbitmqctl {args:?} failed: {stderr}");
    stdout
}

/// Closes, from the broker's side, every connection whose name is `name` or ends with
/// `" <name>"` (the worker's connections are named `amqp-tasks <binary> pid <pid>`, so
/// `pid 42` matches its connection and not that of pid 420); returns how many.
pub async fn close_connections(name: &str) -> usize {
    let listing = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "-q",
        "--no-table-headers",
    ])
    .await;
    let suffix = format!(" {name}");
    let pids: Vec<String> = listing
        .lines()
        .filter(|line| {
            connection_name(line).is_some_and(|found| found == name || found.ends_with(&suffix))
        })
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect();
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "closed by a test"]).await;
    }
    pids.len()
}

/// The `connection_name` client property in a line of `rabbitmqctl list_connections`
/// (`{"connection_name","amqp-tasks ... pid 42"}`).
fn connection_name(line: &str) -> Option<&str> {
    const KEY: &str = "{\"connection_name\",\"";
    let start = line.find(KEY)? + KEY.len();
    let length = line[start..].find("\"}")?;
    Some(&line[start..start + length])
}

/// Runs a command to completion (killed after [`PATIENCE`]) with extra environment variables:
/// (exit code, stdout, stderr).
pub async fn run_command(
    binary: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut command = Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
    let pid = child.id();
    let waited = tokio::time::timeout(
        PATIENCE,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let Ok(output) = waited else {
        let _ = Command::new("kill")
            .args(["-s", "KILL", &pid.to_string()])
            .status();
        panic!("{binary} {args:?} did not exit within {PATIENCE:?}");
    };
    let output = output
        .expect("the waiting thread")
        .unwrap_or_else(|e| panic!("wait for {binary}: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a command to completion from synchronous code (a `Drop`, a one-time set-up run on a
/// blocking thread), killed once `limit` has passed: nothing it starts can hang the tests.
pub fn run_blocking(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .map(|stream| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_end(&mut bytes);
            }
            bytes
        })
    })
    .collect();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut streams = readers
        .into_iter()
        .map(|reader| reader.join().unwrap_or_default());
    std::process::Output {
        status,
        stdout: streams.next().unwrap_or_default(),
        stderr: streams.next().unwrap_or_default(),
    }
}

/// Runs `n` calls at once, each in a task of its own with its own clone of `client`, and returns
/// their results in order.
pub async fn concurrently<T, F, Fut>(client: &Client, n: usize, call: F) -> Vec<T>
where
    F: Fn(Client, usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n)
        .map(|i| tokio::spawn(call(client.clone(), i)))
        .collect();
    let mut results = Vec::with_capacity(n);
    for handle in handles {
        results.push(handle.await.expect("a concurrent call panicked"));
    }
    results
}

/// Delays a `touch` task that runs for `ms`, and waits until a worker has started it; returns its
/// marker path (`<marker>.started`, then `<marker>.done` when it finishes).
pub async fn touch_started(env: &TestEnv, client: &Client, name: &str, ms: u64) -> String {
    let marker = env.path(name);
    crate::tasks::touch::new(marker.clone(), ms)
        .delay(client)
        .await
        .expect("delay touch");
    let started = format!("{marker}.started");
    eventually("the task to start", PATIENCE, || {
        std::fs::metadata(&started).ok()
    })
    .await;
    marker
}

#[cfg(test)]
mod tests {
    use super::connection_name;

    #[test]
    fn connection_names_are_read_whole() {
        let line = "<rabbit@localhost.1.2.0>\t[{\"capabilities\",[]},{\"connection_name\",\"amqp-tasks ./w pid 42\"},{\"product\",\"lapin\"}]";
        assert_eq!(connection_name(line), Some("amqp-tasks ./w pid 42"));
        assert_eq!(connection_name("<pid>\t[]"), None);
    }
}
