//! Production connections against brokers of the tests' own: TLS (a private CA, client
//! certificates with EXTERNAL auth, `verify_none`, no plain-TCP fallback), and a 3-node cluster
//! with quorum queues (a worker and a producer given every node's URL ride out the loss of the
//! nodes they use, and of the whole cluster). The tests run one at a time: each starts nodes.

use amqp_tasks::{CallError, Client};
use amqp_tasks_tests::harness::{PATIENCE, TestEnv, WorkerProcess, bounded, eventually};
use amqp_tasks_tests::node::{Cluster, Node, NodeConfig, Verify};
use amqp_tasks_tests::tasks::*;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const LIMIT: Duration = Duration::from_secs(240);

/// One test at a time: each starts nodes of its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `amqps_url()` with more query parameters.
fn with_params(url: &str, params: &[(&str, String)]) -> String {
    let joined: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{}", joined.join("&"))
}

fn path_of(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_never_a_plain_fallback() {
    let _serial = SERIAL.lock().await;
    let node = Node::start(NodeConfig::tls(Verify::None)).await;
    let ca = path_of(&node.tls().ca);
    let url = with_params(&node.amqps_url(), &[("cacertfile", ca.clone())]);
    let env = TestEnv::with_url("tls", url.clone());
    bounded(LIMIT, async {
        // A worker and a client that trust the private CA serve and call a task over TLS.
        let worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        assert!(
            worker
                .output()
                .contains("node=amqps://guest:***@localhost:"),
            "{}",
            worker.output()
        );
        let client = Client::builder(url.clone())
            .namespace(env.namespace.clone())
            .connect()
            .await
            .expect("a TLS connection with the private CA");
        assert_eq!(add::new(20, 22).call(&client).await, Ok(42));

        // Without the CA, the certificate does not verify: a connect error that says so.
        let untrusted = Client::connect(&node.amqps_url()).await;
        let error = untrusted
            .expect_err("an unknown CA must be refused")
            .to_string();
        assert!(error.contains("certificate"), "{error}");

        // verify_none is allowed, and logged as a warning at every connect.
        let unverified = with_params(&node.amqps_url(), &[("verify", "verify_none".into())]);
        let env_unverified = TestEnv::with_url("tls-unverified", unverified.clone());
        let lax = env_unverified
            .worker(WORKER, &["--tasks", "add"])
            .ready()
            .await;
        assert!(
            lax.output().contains("verify=verify_none"),
            "{}",
            lax.output()
        );
        let lax_client = Client::builder(unverified)
            .namespace(env_unverified.namespace.clone())
            .connect()
            .await
            .unwrap();
        assert_eq!(add::new(1, 1).call(&lax_client).await, Ok(2));

        // Plain AMQP to the TLS port fails, and fast.
        let started = Instant::now();
        let plain = Client::builder(format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.port()))
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await;
        assert!(plain.is_err(), "plain AMQP to a TLS listener");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_with_external_auth() {
    let _serial = SERIAL.lock().await;
    let node = Node::start(NodeConfig::external_auth("amqp-tasks-client")).await;
    let files = node.tls();
    let url = with_params(
        &node.amqps_url(),
        &[
            ("cacertfile", path_of(&files.ca)),
            ("certfile", path_of(&files.client_cert)),
            ("keyfile", path_of(&files.client_key)),
        ],
    );
    let env = TestEnv::with_url("tls-external", url.clone());
    bounded(LIMIT, async {
        let _worker = env.worker(WORKER, &["--tasks", "add"]).ready().await;
        let client = Client::builder(url)
            .namespace(env.namespace.clone())
            .connect()
            .await
            .expect("EXTERNAL with a client certificate, no password");
        assert_eq!(add::new(2, 3).call(&client).await, Ok(5));
        // Without the certificate, the node refuses.
        let without = with_params(&node.amqps_url(), &[("cacertfile", path_of(&files.ca))]);
        assert!(Client::connect(&without).await.is_err());
    })
    .await;
}

/// The port of the node a worker's last `worker ready` line names.
fn worker_port(worker: &WorkerProcess) -> u16 {
    let output = worker.output();
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains("worker ready"))
        .expect("a ready worker");
    port_of(line)
}

fn port_of(text: &str) -> u16 {
    let at = text.rfind("@127.0.0.1:").expect("a node URL") + "@127.0.0.1:".len();
    text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .expect("a port")
}

/// `n ms` lines written by `record_at`: how often each n ran, and the times.
fn records(path: &str) -> (BTreeMap<u64, u32>, Vec<u64>) {
    let mut counts = BTreeMap::new();
    let mut times = Vec::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut parts = line.split(' ');
        if let (Some(Ok(n)), Some(Ok(at))) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u64>),
        ) {
            *counts.entry(n).or_insert(0) += 1;
            times.push(at);
        }
    }
    times.sort_unstable();
    (counts, times)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_loses_a_node_under_load_and_nothing_is_lost() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls().join(",");
    let env = TestEnv::with_url("cluster-failover", urls.clone());
    bounded(LIMIT, async {
        const TASKS: u64 = 5_000;
        let args = [
            "--tasks",
            "record_at,add",
            "--queue-type",
            "quorum",
            "--concurrency",
            "32",
        ];
        let mut worker = env.worker(WORKER, &args).ready().await;
        let worker_pid = worker.pid();
        let client = Client::builder(urls.clone())
            .namespace(env.namespace.clone())
            .confirm_timeout(Duration::from_secs(15))
            .connect()
            .await
            .unwrap();
        let path = env.path("records");
        let origin = Instant::now();

        let sender = tokio::spawn({
            let (client, path) = (client.clone(), path.clone());
            async move {
                let mut outcomes = Vec::with_capacity(TASKS as usize);
                for chunk in (0..TASKS).collect::<Vec<_>>().chunks(50) {
                    let sends: Vec<_> = chunk
                        .iter()
                        .map(|n| {
                            let (client, path, n) = (client.clone(), path.clone(), *n);
                            tokio::spawn(async move {
                                (n, record_at::new(path, n).delay(&client).await)
                            })
                        })
                        .collect();
                    for send in sends {
                        outcomes.push(send.await.unwrap());
                    }
                }
                outcomes
            }
        });
        let caller = tokio::spawn({
            let client = client.clone();
            async move {
                let mut outcomes = Vec::new();
                for i in 0..50 {
                    let started = Instant::now();
                    let result = add::new(i, 1)
                        .timeout(Duration::from_secs(8))
                        .call(&client)
                        .await;
                    outcomes.push((result, started.elapsed()));
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                outcomes
            }
        });

        // Kill the node the worker uses.
        eventually("1,000 tasks run", PATIENCE * 2, || {
            (records(&path).0.len() >= 1_000).then_some(())
        })
        .await;
        let first_port = worker_port(&worker);
        let first = cluster
            .nodes()
            .iter()
            .position(|n| n.port() == first_port)
            .expect("its node");
        let killed_at = Instant::now();
        println!(
            "cluster failover: kill node {first} (port {first_port}) at {:?}",
            origin.elapsed()
        );
        cluster.node(first).kill().await;
        eventually("the worker to resume on another node", PATIENCE, || {
            (worker.output().matches("worker ready").count() >= 2).then_some(())
        })
        .await;
        let resumed_after = killed_at.elapsed();
        assert_ne!(worker_port(&worker), first_port);
        cluster.node(first).start_again().await;
        println!(
            "cluster failover: node {first} back at {:?}",
            origin.elapsed()
        );

        // Then the node the producer uses.
        let deadline = Instant::now() + PATIENCE * 2;
        while records(&path).0.len() < 3_000 {
            if Instant::now() >= deadline {
                let output = worker.output();
                let tail: Vec<&str> = output.lines().rev().take(40).collect();
                panic!(
                    "only {} tasks ran; the producer is on {:?}; the worker's last lines:\n{}",
                    records(&path).0.len(),
                    client.connected_to(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let producer_port = port_of(&client.connected_to().expect("the producer is connected"));
        let second = cluster
            .nodes()
            .iter()
            .position(|n| n.port() == producer_port)
            .expect("its node");
        println!(
            "cluster failover: kill node {second} (port {producer_port}) at {:?}",
            origin.elapsed()
        );
        cluster.node(second).kill().await;

        let sent = sender.await.unwrap();
        let calls = caller.await.unwrap();
        let confirmed: Vec<u64> = sent
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| *n)
            .collect();
        for (n, result) in &sent {
            if let Err(error) = result {
                assert!(
                    matches!(error, CallError::ConnectionLost(_) | CallError::Timeout),
                    "delay {n} failed without saying why: {error:?}"
                );
            }
        }
        let (counts, times) = eventually("every confirmed task to run", PATIENCE * 3, || {
            let (counts, times) = records(&path);
            confirmed
                .iter()
                .all(|n| counts.contains_key(n))
                .then_some((counts, times))
        })
        .await;
        let runs: u32 = counts.values().sum();
        let duplicated = counts.values().filter(|c| **c > 1).count();
        let longest_pause = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let calls_ok = calls.iter().filter(|(r, _)| r.is_ok()).count();
        let mut call_errors: BTreeMap<String, usize> = BTreeMap::new();
        for (result, _) in &calls {
            if let Err(error) = result {
                *call_errors
                    .entry(format!("{error:?}").chars().take(80).collect())
                    .or_default() += 1;
            }
        }
        println!("cluster failover: call errors {call_errors:?}");
        let slowest_call = calls.iter().map(|(_, d)| *d).max().unwrap_or_default();
        println!(
            "cluster failover: sent {TASKS}, confirmed {}, executed {} distinct in {runs} runs, \
             {duplicated} duplicated; the worker resumed on another node {resumed_after:?} after \
             the kill, longest pause between two tasks {longest_pause} ms; calls: {calls_ok} of 50 \
             ok, slowest {slowest_call:?}",
            confirmed.len(),
            counts.len()
        );
        assert!(
            confirmed.len() as u64 >= TASKS - 200,
            "most delays were confirmed: {}",
            confirmed.len()
        );
        // At-least-once: only deliveries unacked when a node went away run twice.
        assert!(duplicated <= 2 * 64, "{duplicated} duplicated");
        for (result, took) in &calls {
            assert!(
                *took < Duration::from_secs(10),
                "a call took {took:?}: {result:?}"
            );
            if let Err(error) = result {
                assert!(
                    matches!(error, CallError::ConnectionLost(_) | CallError::Timeout),
                    "a call failed without saying why: {error:?}"
                );
            }
        }
        assert!(calls_ok >= 40, "{calls_ok} of 50 calls succeeded");
        // The same worker process, which resumed by itself.
        assert!(!worker.has_exited());
        assert_eq!(worker.pid(), worker_pid);
        worker.signal("TERM");
        assert!(worker.exit(PATIENCE).await.code().is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_outage_is_ridden_out_without_a_restart() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls().join(",");
    let env = TestEnv::with_url("cluster-outage", urls.clone());
    bounded(LIMIT, async {
        let args = [
            "--tasks",
            "span",
            "--queue-type",
            "quorum",
            "--concurrency",
            "1",
        ];
        let worker = env.worker(WORKER, &args).ready().await;
        let client = Client::builder(urls)
            .namespace(env.namespace.clone())
            .connect()
            .await
            .unwrap();
        let path = env.path("spans");
        const TASKS: usize = 60;
        for _ in 0..TASKS {
            span::new(path.clone(), 100).delay(&client).await.unwrap();
        }
        let ended = |path: &str| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            text.lines()
                .filter_map(|l| l.strip_prefix("end "))
                .map(|rest| rest.split(' ').next().unwrap_or("").to_owned())
                .collect::<std::collections::BTreeSet<_>>()
        };
        eventually("some tasks run", PATIENCE, || {
            (!ended(&path).is_empty()).then_some(())
        })
        .await;
        // All three nodes go away for ten seconds, with most of the tasks still queued.
        let before = ended(&path).len();
        let stops: Vec<_> = cluster.nodes().iter().map(|n| n.stop_app()).collect();
        futures_join(stops).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let starts: Vec<_> = cluster.nodes().iter().map(|n| n.start_app()).collect();
        futures_join(starts).await;
        // The worker resumes by itself, and the tasks that were queued run.
        eventually("the worker to resume", PATIENCE * 2, || {
            (worker.output().matches("worker ready").count() >= 2).then_some(())
        })
        .await;
        let done = eventually("every queued task to run", PATIENCE * 3, || {
            let done = ended(&path);
            (done.len() == TASKS).then_some(done)
        })
        .await;
        assert!(
            before < TASKS / 2,
            "the outage came with tasks queued ({before} done)"
        );
        assert_eq!(done.len(), TASKS);
        assert!(!worker.output().contains("worker stopped"));
        println!(
            "cluster outage: {TASKS} queued, {before} done before the outage, all ran after it; \
             the worker opened {} sessions",
            worker.output().matches("worker ready").count()
        );
    })
    .await;
}

/// Awaits futures concurrently.
async fn futures_join<F: std::future::Future>(futures: Vec<F>) {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        pinned.retain_mut(|future| match future.as_mut().poll(cx) {
            std::task::Poll::Ready(_) => false,
            std::task::Poll::Pending => {
                pending = true;
                true
            }
        });
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await
}
