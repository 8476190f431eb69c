//! The `amqp-tasks` shell client as a process (`test-shell` runs the same code) against a
//! `test-worker` process: results on stdout, errors on stderr, an exit code per kind of failure.

use amqp_tasks_tests::harness::{PATIENCE, TestEnv, bounded, eventually, eventually_async};
use serde_json::{Value, json};
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const SHELL: &str = env!("CARGO_BIN_EXE_test-shell");
const LIMIT: Duration = Duration::from_secs(60);

/// Runs the shell client in the test's namespace: (exit code, stdout, stderr).
async fn shell(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    env.run(SHELL, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_call_prints_results_and_tells_failures_apart() {
    let env = TestEnv::new("shell-call");
    bounded(LIMIT, async {
        let _worker = env
            .worker(WORKER, &["--tasks", "add,math.div,sleep_ms,record"])
            .ready()
            .await;

        let (code, stdout, stderr) = shell(&env, &["call", "add", r#"{"a": 20, "b": 22}"#]).await;
        assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "42\n", ""));

        // 1: the task's own error: its type, message and JSON value.
        let (code, stdout, stderr) =
            shell(&env, &["call", "math.div", r#"{"a": 1, "b": 0}"#]).await;
        assert_eq!((code, stdout.as_str()), (1, ""), "{stderr}");
        assert!(
            stderr.contains("DivError: division by zero (\"ByZero\")"),
            "{stderr}"
        );

        // 2: usage, before anything is sent.
        for bad in ["{a: 1}", "[1, 2]"] {
            let (code, _, stderr) = shell(&env, &["call", "add", bad]).await;
            assert_eq!(code, 2, "{bad}: {stderr}");
            assert!(stderr.contains("JSON"), "{stderr}");
        }
        let (code, _, _) = shell(&env, &["call"]).await;
        assert_eq!(code, 2);

        // 3: no answer in time.
        let (code, _, stderr) = shell(
            &env,
            &["call", "sleep_ms", r#"{"ms": 5000}"#, "--timeout", "300ms"],
        )
        .await;
        assert_eq!(code, 3, "{stderr}");
        assert!(stderr.contains("timeout"), "{stderr}");

        // 4: no broker there.
        let (code, _, stderr) = shell(
            &env,
            &[
                "call",
                "add",
                "{}",
                "--url",
                "amqp://guest:guest@127.0.0.1:1/%2f",
            ],
        )
        .await;
        assert_eq!(code, 4, "{stderr}");
        assert!(stderr.contains("cannot connect"), "{stderr}");

        // 5: the framework refused the call, saying why.
        let (code, _, stderr) = shell(&env, &["call", "nosuch", "{}"]).await;
        assert_eq!(code, 5, "{stderr}");
        assert!(
            stderr.contains("no_route") && stderr.contains(&env.queue("nosuch")),
            "{stderr}"
        );
        let (code, _, stderr) = shell(&env, &["call", "add", r#"{"a": 1}"#]).await;
        assert_eq!(code, 5, "{stderr}");
        assert!(stderr.contains("missing argument `b`"), "{stderr}");

        // --delay: the task id once confirmed; the task runs.
        let path = env.path("delayed");
        let args = json!({"path": path, "n": 7}).to_string();
        let (code, stdout, stderr) = shell(&env, &["call", "record", &args, "--delay"]).await;
        assert_eq!(code, 0, "{stderr}");
        assert!(uuid::Uuid::parse_str(stdout.trim()).is_ok(), "{stdout}");
        let recorded = eventually("the delayed task to run", PATIENCE, || {
            std::fs::read_to_string(&path).ok()
        })
        .await;
        assert_eq!(recorded, "7\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_queues_reports_depth_consumers_and_dead_letters() {
    let env = TestEnv::new("shell-queues");
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        // `greet` declared, nobody serving it: its tasks wait in the queue.
        let mut declare = env.worker(WORKER, &["--tasks", "greet", "declare"]);
        assert!(declare.exit(PATIENCE).await.success(), "{}", declare.output());
        for _ in 0..2 {
            let (code, _, stderr) =
                shell(&env, &["call", "greet", r#"{"name": "x", "times": 1}"#, "--delay"]).await;
            assert_eq!(code, 0, "{stderr}");
        }
        // A dead letter: arguments the worker cannot decode.
        let (code, _, _) = shell(&env, &["call", "add", r#"{"a": "x", "b": 1}"#]).await;
        assert_eq!(code, 5);

        // The worker answers before its dead letter is confirmed: wait for it to be counted.
        let rows = eventually_async(|| async {
            let (code, stdout, stderr) =
                shell(&env, &["queues", "add", "greet", "nosuch", "--json"]).await;
            assert_eq!(code, 5, "a missing queue is a failure: {stderr}");
            let rows: Value = serde_json::from_str(&stdout).expect("a JSON array");
            (rows[0]["dead_letters"] == 1).then_some(rows)
        })
        .await;
        assert_eq!(
            rows,
            json!([
                {"queue": env.queue("add"), "exists": true, "ready": 0, "consumers": 1, "dead_letters": 1},
                {"queue": env.queue("greet"), "exists": true, "ready": 2, "consumers": 0, "dead_letters": 0},
                {"queue": env.queue("nosuch"), "exists": false},
            ])
        );

        let (code, stdout, stderr) = shell(&env, &["queues", "add", "greet"]).await;
        assert_eq!(code, 0, "{stderr}");
        let table: Vec<Vec<&str>> = stdout
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        let (add, greet) = (env.queue("add"), env.queue("greet"));
        assert_eq!(
            table,
            [
                vec!["QUEUE", "READY", "CONSUMERS", "DEAD", "LETTERS"],
                vec![add.as_str(), "0", "1", "1"],
                vec![greet.as_str(), "2", "0", "0"],
            ]
        );
    })
    .await;
}
