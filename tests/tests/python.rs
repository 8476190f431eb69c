//! Interop with Python services on aio-pika's `JsonRPC` pattern, verified against the real package
//! from PyPI (pinned below) in real processes: Python calls tasks served by a `test-worker`, Rust
//! stubs call functions registered by a Python process.
//!
//! The tests create a virtual environment once, under the target directory, and install aio-pika
//! into it. Without `python3` they skip with a loud message, unless `AMQP_TASKS_REQUIRE_PYTHON`
//! is set (CI sets it): then they fail.

use amqp_tasks::{CallError, task};
use amqp_tasks_tests::harness::{
    PATIENCE, TestEnv, WorkerProcess, amqp_url, bounded, concurrently, eventually_async,
    rabbitmqctl, run_blocking,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const SHELL: &str = env!("CARGO_BIN_EXE_test-shell");
const LIMIT: Duration = Duration::from_secs(60);
/// The aio-pika these tests were written and verified against, with the AMQP libraries under it.
const PYTHON_PACKAGES: [&str; 3] = ["aio-pika==10.2.1", "aiormq==7.2.4", "pamqp==4.0.1"];

// --- Python, in a virtual environment of its own --------------------------------------------

/// The virtual environment's interpreter, created (once per target directory) with aio-pika
/// installed; `None`, after a loud message, when there is no `python3`. The set-up runs on a
/// blocking thread and every step of it is bounded, so the test's own time bound still holds.
async fn python() -> Option<&'static Path> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    tokio::task::spawn_blocking(|| PYTHON.get_or_init(prepare_python).as_deref())
        .await
        .expect("the Python set-up panicked")
}

fn prepare_python() -> Option<PathBuf> {
    let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let found = Command::new(&system)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var_os("AMQP_TASKS_REQUIRE_PYTHON").is_none(),
            "`{system}` was not found, and AMQP_TASKS_REQUIRE_PYTHON is set: the Python interop \
             tests must run here (install python3 with its venv module, or set PYTHON)"
        );
        // Straight to stderr: the test harness captures `eprintln!` of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n{0}\n!!! `{system}` was not found: the Python interop tests are SKIPPED (install \
             python3 with its venv module, or set PYTHON)\n{0}\n",
            "!".repeat(100)
        );
        return None;
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join("python-venv");
    let interpreter = venv.join(if cfg!(windows) {
        "Scripts/python.exe"
    } else {
        "bin/python"
    });
    // Other test processes of this target directory may be preparing it too.
    let lock = std::fs::File::create(root.join("python-venv.lock")).expect("create the lock file");
    lock.lock().expect("lock the virtual environment");
    let marker = venv.join("amqp-tasks-installed");
    let wanted = PYTHON_PACKAGES.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|installed| installed == wanted) {
        return Some(interpreter);
    }
    // Absent, half made, or another version: start afresh.
    let _ = std::fs::remove_dir_all(&venv);
    run_setup(
        Command::new(&system).arg("-m").arg("venv").arg(&venv),
        Duration::from_secs(120),
    );
    run_setup(
        Command::new(&interpreter)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--timeout", "30"])
            .args(PYTHON_PACKAGES),
        Duration::from_secs(600),
    );
    std::fs::write(&marker, wanted).expect("write the marker");
    Some(interpreter)
}

fn run_setup(command: &mut Command, limit: Duration) {
    let output = run_blocking(command, limit);
    assert!(
        output.status.success(),
        "{command:?} failed (the Python interop tests need the venv module and PyPI):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn script(name: &str) -> String {
    format!("{}/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn spawn_python(python: &Path, args: &[&str]) -> WorkerProcess {
    let mut all = vec!["-u"];
    all.extend_from_slice(args);
    WorkerProcess::spawn(
        python.to_str().expect("a UTF-8 path"),
        &all,
        &[("AMQP_URL", &amqp_url())],
    )
}

/// Runs `call.py`: calls `cases` concurrently with `JsonRPC.call` and returns each outcome.
async fn python_calls(python: &Path, cases: &Value) -> Vec<Value> {
    let mut process = spawn_python(python, &[&script("call.py"), &cases.to_string()]);
    let status = process.exit(PATIENCE).await;
    let output = process.output();
    assert!(status.success(), "call.py failed:\n{output}");
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("RESULTS "))
        .unwrap_or_else(|| panic!("no RESULTS line from call.py:\n{output}"));
    serde_json::from_str(line).expect("RESULTS is JSON")
}

fn case(env: &TestEnv, task: &str, kwargs: Value) -> Value {
    json!({"method": env.queue(task), "kwargs": kwargs, "wait": 10})
}

/// The `{"error": {...}}` payload of a `JsonRPCError`, which is what aio-pika raises for an
/// `error` reply (its args are `("RPC exception", payload)`).
fn rpc_error(outcome: &Value) -> &Value {
    assert_eq!(outcome["raised"], "JsonRPCError", "{outcome}");
    assert_eq!(outcome["args"][0], "RPC exception", "{outcome}");
    &outcome["args"][1]["error"]
}

// --- Python calls Rust ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_json_rpc_calls_rust_tasks() {
    let Some(python) = python().await else { return };
    let env = TestEnv::new("py-calls");
    bounded(LIMIT, async {
        let _worker = env
            .worker(WORKER, &["--tasks", "add,math.div,greet,boom"])
            .ready()
            .await;
        let mut cases = vec![
            case(&env, "add", json!({"a": 1, "b": 2})),
            // An `Option` argument may be left out.
            case(&env, "greet", json!({"name": "py", "times": 2})),
            case(&env, "math.div", json!({"a": 1, "b": 0})),
            case(&env, "add", json!({"a": 1})),
            case(&env, "add", json!({"a": "one", "b": 2})),
            case(&env, "add", json!({"a": 1, "b": 2, "c": 3})),
            case(&env, "boom", json!({"message": "kaboom"})),
            // No such queue: published with `mandatory`, returned, raised at once.
            case(&env, "nosuch", json!({})),
        ];
        // Priorities are accepted (and ignored: task queues have no `x-max-priority`).
        cases.push(json!({"method": env.queue("add"), "kwargs": {"a": 2, "b": 2}, "priority": 9, "wait": 10}));
        // The pickle-based `RPC` pattern is not compatible: refused (with a JSON error reply,
        // which aio-pika fails to unpickle) rather than left hanging.
        cases.push(json!({"method": env.queue("add"), "kwargs": {"a": 1, "b": 1}, "pickle": true, "wait": 10}));
        // Concurrent calls are told apart by their correlation ids.
        for i in 0..20 {
            cases.push(case(&env, "add", json!({"a": i, "b": 1000})));
        }
        let outcomes = python_calls(python, &Value::Array(cases)).await;

        assert_eq!(outcomes[0]["result"], 3, "{}", outcomes[0]);
        assert_eq!(outcomes[1]["result"], "hello py, hello py", "{}", outcomes[1]);

        let div = rpc_error(&outcomes[2]);
        assert_eq!(div["type"], "DivError");
        assert_eq!(div["message"], "division by zero");
        assert_eq!(div["args"], json!(["division by zero"]));
        assert_eq!((&div["kind"], &div["value"]), (&json!("task"), &json!("ByZero")));

        let missing = rpc_error(&outcomes[3]);
        assert_eq!(missing["kind"], "bad_payload");
        assert_eq!(missing["type"], "BadPayload", "a Python-style exception type");
        assert!(
            missing["message"].as_str().unwrap().contains("missing argument `b`"),
            "{missing}"
        );
        let wrong_type = rpc_error(&outcomes[4]);
        assert_eq!(wrong_type["kind"], "bad_payload");
        assert!(
            wrong_type["message"].as_str().unwrap().contains("argument `a`"),
            "{wrong_type}"
        );
        let unknown = rpc_error(&outcomes[5]);
        assert!(
            unknown["message"].as_str().unwrap().contains("unknown argument `c`"),
            "{unknown}"
        );
        let panicked = rpc_error(&outcomes[6]);
        assert_eq!((&panicked["kind"], &panicked["message"]), (&json!("panicked"), &json!("kaboom")));

        assert_eq!(outcomes[7]["raised"], "MessageProcessError", "{}", outcomes[7]);
        assert_eq!(outcomes[7]["args"][0], "Message has been returned");
        assert!(outcomes[7]["elapsed"].as_f64().unwrap() < 5.0, "{}", outcomes[7]);

        assert_eq!(outcomes[8]["result"], 4, "{}", outcomes[8]);
        assert_eq!(outcomes[9]["raised"], "UnpicklingError", "{}", outcomes[9]);
        for (i, outcome) in outcomes[10..].iter().enumerate() {
            assert_eq!(outcome["result"], 1000 + i, "{outcome}");
        }
        // Undecodable arguments, pickles and panics are answered and dead-lettered (the answer
        // comes first: once every message is acked, every dead letter is written); a task
        // error is an answer only, and good calls are neither.
        for queue in ["add", "boom", "math.div", "greet"] {
            env.settled(queue).await;
        }
        assert_eq!(env.depth("add.dlq").await, 4);
        assert_eq!(env.depth("boom.dlq").await, 1);
        assert_eq!(env.depth("math.div.dlq").await, 0);
        assert_eq!(env.depth("greet.dlq").await, 0);
    })
    .await;
}

/// Removes a broker policy when dropped, even after a failed assertion.
struct Policy(String);

impl Drop for Policy {
    fn drop(&mut self) {
        run_blocking(
            Command::new("rabbitmqctl").args(["clear_policy", "-q", &self.0]),
            Duration::from_secs(30),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_call_expiration_on_a_rust_queue() {
    let Some(python) = python().await else { return };
    let env = TestEnv::new("py-expire");
    bounded(LIMIT, async {
        // The queue as a worker declares it, and nobody consuming it.
        let mut declare = env.worker(WORKER, &["--tasks", "add", "declare"]);
        assert!(
            declare.exit(PATIENCE).await.success(),
            "{}",
            declare.output()
        );
        let expiring = json!({"method": env.queue("add"), "kwargs": {"a": 1, "b": 2},
            "expiration": 0.3, "wait": 2});

        // aio-pika's queues dead-letter expired calls to `rpc.dlx`, which routes them back to
        // the caller (by its `From` header) as a timeout. Task queues have no dead-letter
        // exchange (their arguments are frozen): the expired call is dropped, and only the
        // caller's own bound ends the wait.
        let outcome = &python_calls(python, &json!([expiring])).await[0];
        assert_eq!(
            (&outcome["raised"], &outcome["args"]),
            (&json!("TimeoutError"), &json!([])),
            "{outcome}"
        );
        assert!(outcome["elapsed"].as_f64().unwrap() >= 1.9, "{outcome}");
        assert_eq!(
            env.depth("add").await,
            0,
            "the expired call is not left to run later"
        );

        // The documented remedy: a policy (not a queue argument) that gives task queues
        // aio-pika's dead-letter exchange. Then aio-pika raises its own timeout at expiry.
        let name = format!("rpc-dlx-{}", env.namespace);
        let queue = env.queue("add");
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        rabbitmqctl(&[
            "set_policy",
            "-q",
            &name,
            &pattern,
            r#"{"dead-letter-exchange": "rpc.dlx"}"#,
            "--apply-to",
            "queues",
        ])
        .await;
        let _policy = Policy(name.clone());
        eventually_async(|| async {
            let listing =
                rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "policy"]).await;
            listing
                .lines()
                .any(|line| line.split('\t').collect::<Vec<_>>() == [queue.as_str(), name.as_str()])
                .then_some(())
        })
        .await;
        let outcome = &python_calls(python, &json!([expiring])).await[0];
        assert_eq!(outcome["raised"], "TimeoutError", "{outcome}");
        assert_eq!(outcome["args"][0], "Message timed-out", "{outcome}");
        assert!(outcome["elapsed"].as_f64().unwrap() < 1.9, "{outcome}");
    })
    .await;
}

// --- Rust calls Python ------------------------------------------------------------------------

// Declarations only: the functions are served by `python/serve.py`. JSON is the codec aio-pika
// speaks; its error replies carry no `kind`, so a Python exception is a `CallError::Remote`.
#[task(name = "multiply", codec = "json")]
async fn multiply(x: i64, y: i64) -> i64;

#[task(name = "divide", codec = "json")]
async fn divide(a: f64, b: f64) -> Result<f64, String>;

#[task(name = "slow", codec = "json")]
async fn slow(ms: u64) -> u64;

/// Served by a `JsonRPC` subclass whose error replies add `kind` and `value`.
#[task(name = "check_quota", codec = "json")]
async fn check_quota(user: String) -> Result<(), QuotaError>;

/// The same function, with the default codec (bincode), which aio-pika cannot read.
#[task(name = "multiply")]
async fn multiply_bincode(x: i64, y: i64) -> i64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum QuotaError {
    QuotaExceeded { user: String, limit: u32 },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_stubs_call_python_json_rpc_functions() {
    let Some(python) = python().await else { return };
    let env = TestEnv::new("rust-calls-py");
    for function in ["multiply", "divide", "slow", "check_quota"] {
        env.track(function);
    }
    bounded(LIMIT, async {
        let mut service = spawn_python(python, &[&script("serve.py"), &env.namespace]);
        service.wait_for("ready").await;
        let client = env.client().await;

        assert_eq!(multiply::new(6, 7).call(&client).await, Ok(42));
        assert_eq!(divide::new(1.0, 4.0).call(&client).await, Ok(0.25));
        let products = concurrently(&client, 20, |client, i| async move {
            multiply::new(i as i64, 3).call(&client).await
        })
        .await;
        for (i, product) in products.into_iter().enumerate() {
            assert_eq!(product, Ok(3 * i as i64));
        }

        // A Python exception: its class name and aio-pika's message (the exception's repr).
        match divide::new(1.0, 0.0).call(&client).await {
            Err(CallError::Remote { kind, message }) => {
                assert_eq!(kind, "ZeroDivisionError");
                assert!(message.contains("division by zero"), "{message}");
            }
            other => panic!("expected a remote ZeroDivisionError, got {other:?}"),
        }
        // An error reply with `kind` = `task` and a `value` is the stub's typed error.
        assert_eq!(
            check_quota::new("ann".into()).call(&client).await,
            Err(CallError::Task(QuotaError::QuotaExceeded {
                user: "ann".into(),
                limit: 3
            }))
        );
        // Bincode bodies are not JSON: Python says so.
        match multiply_bincode::new(2, 3).call(&client).await {
            Err(CallError::Remote { kind, .. }) => {
                assert!(kind.contains("Decode"), "{kind}");
            }
            other => panic!("expected a decoding error from Python, got {other:?}"),
        }
        assert_eq!(
            slow::new(2_000)
                .timeout(Duration::from_millis(300))
                .call(&client)
                .await,
            Err(CallError::Timeout)
        );

        // The shell client calls Python functions too.
        let (code, stdout, _) = shell(&env, &["call", "multiply", r#"{"x": 5, "y": 5}"#]).await;
        assert_eq!((code, stdout.trim()), (0, "25"));
        let (code, _, stderr) = shell(&env, &["call", "divide", r#"{"a": 1, "b": 0}"#]).await;
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("ZeroDivisionError"), "{stderr}");

        // aio-pika's queues were declared by Python alone (auto-delete): once it is gone, so
        // are they, and a call is a `NoRoute` at once rather than a wait.
        service.signal("TERM");
        assert!(
            service.exit(PATIENCE).await.success(),
            "{}",
            service.output()
        );
        let queue = eventually_async(|| async {
            // Bounded: while the queue still exists, the call would wait in it.
            let call = multiply::new(1, 1).timeout(Duration::from_millis(200));
            match call.call(&client).await {
                Err(CallError::NoRoute { queue }) => Some(queue),
                _ => None,
            }
        })
        .await;
        assert_eq!(queue, env.queue("multiply"));
    })
    .await;
}

/// Runs the shell client in the test's namespace: (exit code, stdout, stderr).
async fn shell(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    env.run(SHELL, args).await
}
