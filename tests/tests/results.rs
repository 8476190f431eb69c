//! Task states and results by id, in the machine's Redis and PostgreSQL (both started by
//! `.ci/run`), with workers as separate processes; each test in its own namespace, whose records
//! (Redis keys, PostgreSQL table) are deleted with it.
//!
//! For both stores: a `.delay()` then `wait` from a second client gets the typed result (and a
//! stub of another task is a signature mismatch, an unknown id is `None`); `status` moves through
//! `Started` → `Retrying` → `Succeeded` for a task that fails once; progress is visible while the
//! task runs; a failing task is `Failed` with its typed error; a task refused without running is
//! `DeadLettered` with its framework error; expiry removes records. A private
//! `redis-server` stopped mid-run loses no task; a store that cannot be reached, or that was not
//! compiled in, is a clear start-up error.

use amqp_tasks::{CallError, Client, TaskId, TaskState};
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, WorkerProcess, bounded, run_blocking};
use amqp_tasks_tests::tasks::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(60);
const REDIS: &str = "redis://127.0.0.1:6379/0";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    Redis,
    Postgres,
}

/// A test's namespace and its records in a store, deleted when dropped.
struct Env {
    env: TestEnv,
    store: Store,
    url: String,
}

impl Env {
    fn new(test: &str, store: Store) -> Env {
        let url = match store {
            Store::Redis => REDIS,
            Store::Postgres => POSTGRES,
        };
        Env::at(test, store, url.to_owned())
    }

    fn at(test: &str, store: Store, url: String) -> Env {
        Env {
            env: TestEnv::new(test),
            store,
            url,
        }
    }

    /// A worker of the tasks `tasks`, writing to the store.
    async fn worker(&self, tasks: &str, more: &[&str]) -> WorkerProcess {
        let mut args = vec!["--tasks", tasks, "--results", &self.url];
        args.extend_from_slice(more);
        self.env.worker(WORKER, &args).ready().await
    }

    /// A client reading the store.
    async fn reader(&self) -> Client {
        Client::builder(self.env.url.clone())
            .namespace(self.env.namespace.clone())
            .results(self.url.clone())
            .connect()
            .await
            .expect("connect with a result store")
    }

    /// Rows of the namespace's table (PostgreSQL), expired ones included.
    fn rows(&self) -> usize {
        let sql = format!(
            "SELECT count(*) FROM \"{}.amqp_tasks_results\"",
            self.env.namespace
        );
        let output = run_blocking(
            Command::new("psql").args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-Atc",
                &sql,
            ]),
            PATIENCE,
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a count")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let namespace = &self.env.namespace;
        match self.store {
            Store::Redis => {
                let port = self
                    .url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.split('/').next())
                    .unwrap_or("6379");
                let script = format!(
                    "redis-cli -h 127.0.0.1 -p {port} --scan --pattern '{namespace}.amqp-tasks.*' | xargs -r redis-cli -h 127.0.0.1 -p {port} del >/dev/null"
                );
                let _ = std::panic::catch_unwind(|| {
                    run_blocking(Command::new("sh").args(["-c", &script]), PATIENCE)
                });
            }
            Store::Postgres => {
                let sql = format!("DROP TABLE IF EXISTS \"{namespace}.amqp_tasks_results\"");
                let _ = std::panic::catch_unwind(|| {
                    run_blocking(
                        Command::new("psql").args([
                            "-h",
                            "127.0.0.1",
                            "-U",
                            "postgres",
                            "-d",
                            "test",
                            "-qc",
                            &sql,
                        ]),
                        PATIENCE,
                    )
                });
            }
        }
    }
}

/// Polls `status` until `done` says so (bounded by `PATIENCE`), returning every distinct state
/// seen in order.
async fn states_until(
    client: &Client,
    id: &TaskId,
    done: impl Fn(TaskState) -> bool,
) -> Vec<TaskState> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let status = client.status(id).await.expect("status");
        if let Some(status) = status {
            if seen.last() != Some(&status.state) {
                seen.push(status.state);
            }
            if done(status.state) {
                return seen;
            }
        }
        assert!(Instant::now() < deadline, "states so far: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delay_then_wait_from_a_second_client(store: Store) {
    let env = Env::new("res-wait", store);
    bounded(LIMIT, async {
        let worker = env.worker("add,math.div", &[]).await;
        // The producer has no store: `.delay()` costs what it does without one.
        let producer = env.env.client().await;
        let id = add::new(2, 3).delay(&producer).await.expect("delay");
        let reader = env.reader().await;
        assert_eq!(reader.wait::<add>(&id, PATIENCE).await, Ok(5));
        assert_eq!(reader.result::<add>(&id).await.expect("read"), Some(Ok(5)));
        let status = reader.status(&id).await.expect("status").expect("a record");
        assert_eq!(status.state, TaskState::Succeeded);
        assert_eq!(status.attempt, 1);
        // Read through the stub of another task: refused, not misread.
        let other = reader.result::<div>(&id).await.expect("read");
        assert!(
            matches!(other, Some(Err(CallError::SignatureMismatch(ref m))) if m.contains("`add`")),
            "{other:?}"
        );
        let unknown = TaskId::new();
        assert_eq!(reader.status(&unknown).await.expect("status"), None);
        assert_eq!(reader.result::<add>(&unknown).await.expect("read"), None);
        assert_eq!(
            reader
                .wait::<add>(&unknown, Duration::from_millis(300))
                .await,
            Err(CallError::Timeout)
        );
        // A client without a store is told so.
        let error = producer.status(&id).await.expect_err("no store");
        assert!(error.to_string().contains("no result store"), "{error}");
        drop(worker);
    })
    .await;
}

async fn status_moves_through_retrying(store: Store) {
    let env = Env::new("res-retry", store);
    bounded(LIMIT, async {
        let worker = env.worker("fails_once", &[]).await;
        let reader = env.reader().await;
        let id = fails_once::new(400).delay(&reader).await.expect("delay");
        let seen = states_until(&reader, &id, TaskState::is_final).await;
        assert_eq!(
            seen,
            [
                TaskState::Started,
                TaskState::Retrying,
                TaskState::Started,
                TaskState::Succeeded
            ]
        );
        let status = reader.status(&id).await.expect("status").expect("a record");
        assert_eq!(status.attempt, 2);
        assert_eq!(reader.wait::<fails_once>(&id, PATIENCE).await, Ok(2));
        drop(worker);
    })
    .await;
}

async fn progress_is_visible_while_the_task_runs(store: Store) {
    let env = Env::new("res-progress", store);
    bounded(LIMIT, async {
        let worker = env.worker("steps", &[]).await;
        let reader = env.reader().await;
        let id = steps::new(4, 300).delay(&reader).await.expect("delay");
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        loop {
            if let Some(status) = reader.status(&id).await.expect("status") {
                if status.state == TaskState::Started
                    && let (Some(progress), Some(message)) = (status.progress, status.message)
                    && seen.last().is_none_or(|(_, m)| *m != message)
                {
                    seen.push((progress, message));
                }
                if status.state.is_final() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "progress so far: {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(seen.len() >= 3, "most steps seen while running: {seen:?}");
        assert!(seen.contains(&(0.5, "step 2 of 4".to_owned())), "{seen:?}");
        assert_eq!(reader.wait::<steps>(&id, PATIENCE).await, Ok(4));
        drop(worker);
    })
    .await;
}

async fn a_failing_task_is_failed_with_its_typed_error(store: Store) {
    let env = Env::new("res-fail", store);
    bounded(LIMIT, async {
        let worker = env.worker("math.div,add_unstored", &[]).await;
        let reader = env.reader().await;
        let id = div::new(1, 0).delay(&reader).await.expect("delay");
        assert_eq!(
            reader.wait::<div>(&id, PATIENCE).await,
            Err(CallError::Task(DivError::ByZero))
        );
        let status = reader.status(&id).await.expect("status").expect("a record");
        assert_eq!(status.state, TaskState::Failed);
        assert_eq!(
            reader.result::<div>(&id).await.expect("read"),
            Some(Err(CallError::Task(DivError::ByZero)))
        );
        // A task with `store_result = false` runs, and leaves nothing in the store.
        assert_eq!(add_unstored::new(1, 1).call(&reader).await, Ok(2));
        let unstored = add_unstored::new(2, 2).delay(&reader).await.expect("delay");
        assert_eq!(add_unstored::new(3, 3).call(&reader).await, Ok(6));
        let id = div::new(4, 2).delay(&reader).await.expect("delay");
        assert_eq!(reader.wait::<div>(&id, PATIENCE).await, Ok(2));
        assert_eq!(reader.status(&unstored).await.expect("status"), None);
        drop(worker);
    })
    .await;
}

async fn a_refused_task_is_dead_lettered(store: Store) {
    let env = Env::new("res-dead", store);
    bounded(LIMIT, async {
        let worker = env.worker("add", &[]).await;
        let reader = env.reader().await;
        let raw = env.env.raw().await;
        let id = TaskId::new();
        let mut headers = FieldTable::default();
        headers.insert("task".into(), AMQPValue::LongString("add".into()));
        raw.channel
            .basic_publish(
                "".into(),
                env.env.queue("add").as_str().into(),
                BasicPublishOptions::default(),
                br#"{"a": "one", "b": 2}"#,
                BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let outcome = reader.wait::<add>(&id, PATIENCE).await;
        assert!(
            matches!(outcome, Err(CallError::BadPayload(_))),
            "{outcome:?}"
        );
        let status = reader.status(&id).await.expect("status").expect("a record");
        assert_eq!(status.state, TaskState::DeadLettered);
        env.env.settled("add").await;
        drop(worker);
    })
    .await;
}

async fn expiry_removes_records(store: Store) {
    let env = Env::new("res-expiry", store);
    bounded(LIMIT, async {
        let worker = env.worker("add", &["--result-ttl", "1s"]).await;
        let reader = env.reader().await;
        let id = add::new(1, 2).delay(&reader).await.expect("delay");
        assert_eq!(reader.wait::<add>(&id, PATIENCE).await, Ok(3));
        let deadline = Instant::now() + Duration::from_secs(10);
        while reader.status(&id).await.expect("status").is_some() {
            assert!(Instant::now() < deadline, "the record outlived its TTL");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(reader.result::<add>(&id).await.expect("read"), None);
        if store == Store::Postgres {
            // The worker deletes expired rows as it writes new ones.
            let next = add::new(2, 2).delay(&reader).await.expect("delay");
            assert_eq!(reader.wait::<add>(&next, PATIENCE).await, Ok(4));
            assert_eq!(env.rows(), 1, "only the fresh record is left");
        }
        drop(worker);
    })
    .await;
}

/// A task revoked before it ran is `Revoked` in the store, and `wait` says `CallError::Revoked`.
async fn a_revoked_task_is_revoked_in_the_store(store: Store) {
    const SHELL: &str = env!("CARGO_BIN_EXE_test-shell");
    let env = Env::new("res-revoke", store);
    bounded(LIMIT, async {
        let worker = env.worker("add", &[]).await;
        let producer = env.env.client().await;
        let id = add::new(1, 1)
            .countdown(Duration::from_secs(2))
            .delay(&producer)
            .await
            .expect("delay");
        let (code, stdout, stderr) = env.env.run(SHELL, &["revoke", id.as_str()]).await;
        assert_eq!(code, 0, "{stdout}{stderr}");
        let reader = env.reader().await;
        assert_eq!(
            reader.wait::<add>(&id, PATIENCE).await,
            Err(CallError::Revoked)
        );
        let status = reader.status(&id).await.expect("status").expect("a record");
        assert_eq!(status.state, TaskState::Revoked);
        assert_eq!(
            reader.result::<add>(&id).await.expect("read"),
            Some(Err(CallError::Revoked))
        );
        drop(worker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_revoked_task_is_revoked_in_the_store() {
    a_revoked_task_is_revoked_in_the_store(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_revoked_task_is_revoked_in_the_store() {
    a_revoked_task_is_revoked_in_the_store(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_delay_then_wait_from_a_second_client() {
    delay_then_wait_from_a_second_client(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_delay_then_wait_from_a_second_client() {
    delay_then_wait_from_a_second_client(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_status_moves_through_retrying() {
    status_moves_through_retrying(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_status_moves_through_retrying() {
    status_moves_through_retrying(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_progress_is_visible_while_the_task_runs() {
    progress_is_visible_while_the_task_runs(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_progress_is_visible_while_the_task_runs() {
    progress_is_visible_while_the_task_runs(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_failing_task_is_failed_with_its_typed_error() {
    a_failing_task_is_failed_with_its_typed_error(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_failing_task_is_failed_with_its_typed_error() {
    a_failing_task_is_failed_with_its_typed_error(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_refused_task_is_dead_lettered() {
    a_refused_task_is_dead_lettered(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_refused_task_is_dead_lettered() {
    a_refused_task_is_dead_lettered(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_expiry_removes_records() {
    expiry_removes_records(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_expiry_removes_records() {
    expiry_removes_records(Store::Postgres).await;
}

/// A private `redis-server` on a port of its own, stopped when dropped.
struct PrivateRedis {
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    async fn start(dir: std::path::PathBuf) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        std::fs::create_dir_all(&dir).expect("its directory");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = PrivateRedis { port, child, dir };
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_away_mid_run_loses_no_task() {
    let env = TestEnv::new("res-gone");
    let mut redis = PrivateRedis::start(env.dir.join("redis")).await;
    bounded(LIMIT, async {
        let url = redis.url();
        let worker = env
            .worker(
                WORKER,
                &["--tasks", "record,add", "--results", &url, "-c", "4"],
            )
            .ready()
            .await;
        let reader = Client::builder(env.url.clone())
            .namespace(env.namespace.clone())
            .results(url.clone())
            .connect()
            .await
            .expect("connect");
        let first = add::new(1, 1).delay(&reader).await.expect("delay");
        assert_eq!(reader.wait::<add>(&first, PATIENCE).await, Ok(2));
        redis.stop();
        // Every task still runs and is acked while the store is gone.
        let path = env.path("records");
        for n in 0..50 {
            record::new(path.clone(), n)
                .delay(&reader)
                .await
                .expect("delay");
        }
        assert_eq!(add::new(2, 2).call(&reader).await, Ok(4));
        env.settled("record").await;
        let mut lines: Vec<u64> = std::fs::read_to_string(&path)
            .expect("records")
            .lines()
            .map(|l| l.parse().expect("a number"))
            .collect();
        lines.sort_unstable();
        assert_eq!(lines, (0..50).collect::<Vec<_>>());
        // The reader is told the store is unreachable; it does not hang.
        let error = reader.status(&first).await.expect_err("the store is down");
        assert!(error.to_string().contains("result store"), "{error}");
        worker
            .wait_for("could not write task states to the result store; given up")
            .await;
        drop(worker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_unknown_store_is_a_clear_start_up_error() {
    let env = TestEnv::new("res-bad");
    bounded(LIMIT, async {
        for (url, expected) in [
            (
                "redis://127.0.0.1:1/0",
                "result store redis://127.0.0.1:1/0",
            ),
            ("memcached://127.0.0.1", "expected redis:// or postgres://"),
        ] {
            let mut worker = env.worker(WORKER, &["--tasks", "add", "--results", url]);
            let status = worker.exit(PATIENCE).await;
            let output = worker.output();
            assert_eq!(status.code(), Some(1), "{output}");
            assert!(output.contains(expected), "{output}");
        }
    })
    .await;
}
