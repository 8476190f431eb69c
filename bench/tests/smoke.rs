//! The bench must not rot: `cargo test --workspace` runs every scenario with `--smoke` (tiny N,
//! one repetition, no targets) against the broker at `AMQP_URL`, bounded in time, and checks that
//! it printed a `RESULT` line per scenario (and per baseline with fewer guarantees), wrote its
//! chart and deleted its queues. The `peers` scenario is not part of `all` (it installs Celery
//! and aio-pika and builds the Rust `celery` crate): it has no smoke test here.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| amqp_tasks::DEFAULT_URL.to_owned())
}

#[test]
fn every_scenario_runs_in_smoke_mode_and_cleans_up() {
    let svg = std::env::temp_dir().join(format!(
        "amqp-tasks-bench-smoke-{}.svg",
        uuid::Uuid::new_v4().simple()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_amqp-tasks-bench"))
        .args(["all", "--smoke", "--svg"])
        .arg(&svg)
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the bench");
    // Both streams are read while the bench runs: a chatty run must not block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let errors_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the bench") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the smoke run did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = reader.join().expect("stdout reader");
    let errors = errors_reader.join().expect("stderr reader");
    assert!(
        status.success(),
        "the smoke run failed ({status}):\n{output}\n{errors}"
    );

    for scenario in [
        "delay",
        "delay-batched-ack",
        "call-1",
        "call-1-plain",
        "call-64",
        "call-64-plain",
        "call-64-one-task",
        "memory",
        "scale-1",
        "scale-2",
        "scale-4",
    ] {
        let prefix = format!("RESULT scenario={scenario} ");
        let line = output
            .lines()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no RESULT line for {scenario}:\n{output}"));
        for key in ["framework=", "baseline=", "ratio=", "unit="] {
            assert!(line.contains(key), "{key} missing in: {line}");
        }
        assert!(
            !line.contains("target_met"),
            "smoke mode judges nothing: {line}"
        );
    }
    let chart = std::fs::read_to_string(&svg).expect("the chart was written");
    let _ = std::fs::remove_file(&svg);
    assert!(chart.starts_with("<svg") && chart.contains("raw lapin"));

    // Every namespace the run announced is gone from the broker.
    let namespaces: Vec<&str> = output
        .lines()
        .filter_map(|line| line.split("(namespace ").nth(1))
        .filter_map(|rest| rest.split(',').next())
        .collect();
    assert_eq!(namespaces.len(), 5, "one namespace per scenario:\n{output}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        for namespace in namespaces {
            for queue in [
                format!("{namespace}.bench.sink"),
                format!("{namespace}.bench.echo"),
                format!("{namespace}.raw.sink"),
                format!("{namespace}.raw.batched"),
                format!("{namespace}.amqp-tasks.delay.100ms"),
            ] {
                let channel = connection.create_channel().await.expect("channel");
                let found = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                assert!(found.is_err(), "{queue} was left behind");
            }
        }
        let _ = connection.close(200, "checked".into()).await;
    });
}
