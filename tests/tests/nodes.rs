//! The `node` helper itself: private RabbitMQ nodes (plain, TLS, EXTERNAL auth) and a 3-node
//! cluster beside the shared broker, crashed and started again, and cleaned up after.
//!
//! Run with `cargo test -p amqp-tasks-tests --test nodes -- --nocapture` to see the start times.

use amqp_tasks_tests::harness::{bounded, run_command};
use amqp_tasks_tests::node::{
    AMQP_HEADER, BASE_DIR, Cluster, MARKER, Node, NodeConfig, Verify, amqp_methods, openssl,
    sweep_leftovers,
};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::future::Future;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// How long a connection attempt may take before it counts as hanging.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

async fn connect(url: &str) -> Result<Connection, String> {
    match tokio::time::timeout(
        CONNECT_LIMIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_LIMIT:?}")),
    }
}

/// The number of messages in `queue` through the node at `url` (passive declare), on a
/// connection of its own.
async fn depth(url: &str, queue: &str) -> Result<u32, String> {
    let connection = connect(url).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let declared = tokio::time::timeout(
        CONNECT_LIMIT,
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    let _ = connection.close(200, "bye".into()).await;
    match declared {
        Ok(Ok(queue)) => Ok(queue.message_count()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("queue.declare timed out".into()),
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        !matches!(state, None | Some("Z") | Some("X"))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_started_again_keeps_its_durable_queue() {
    bounded(Duration::from_secs(180), async {
        let started = Instant::now();
        let node = Node::start(NodeConfig::plain()).await;
        println!("one node answered after {:?}", started.elapsed());
        assert_ne!(node.port(), 5672);
        let url = node.amqp_url();

        let connection = connect(&url).await.expect("connect to the private node");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        channel
            .queue_declare(
                "survivor".into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare a durable queue");
        let confirm = channel
            .basic_publish(
                "".into(),
                "survivor".into(),
                BasicPublishOptions::default(),
                b"persistent",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());

        // Without this, RabbitMQ may forget the queue (not the message) in the crash.
        node.flush_metadata().await;
        let pid = node.os_pid().expect("the node's pid");
        let killed = Instant::now();
        node.kill().await;
        println!("SIGKILLed pid {pid} in {:?}", killed.elapsed());
        assert_eq!(node.os_pid(), None);
        let refused = connect(&url).await;
        assert!(refused.is_err(), "connected to a killed node");
        drop(connection);

        let restarted = Instant::now();
        node.start_again().await;
        println!(
            "the same node answered again after {:?}",
            restarted.elapsed()
        );
        assert_ne!(node.os_pid(), Some(pid));
        assert_eq!(
            depth(&url, "survivor").await,
            Ok(1),
            "the durable queue and its persistent message survive the crash"
        );

        // The gentler ways: RabbitMQ stopped inside a running Erlang node, and the node stopped.
        let cycle = Instant::now();
        node.stop_app().await;
        assert!(connect(&url).await.is_err(), "connected after stop_app");
        node.start_app().await;
        assert_eq!(depth(&url, "survivor").await, Ok(1), "after start_app");
        println!("stop_app and start_app took {:?}", cycle.elapsed());
        let cycle = Instant::now();
        node.stop().await;
        assert_eq!(node.os_pid(), None);
        assert!(connect(&url).await.is_err(), "connected after stop");
        node.start_again().await;
        assert_eq!(depth(&url, "survivor").await, Ok(1), "after stop and start");
        println!("stop and start_again took {:?}", cycle.elapsed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_only_node_answers_tls_and_refuses_plain_amqp() {
    bounded(Duration::from_secs(120), async {
        let started = Instant::now();
        let node = Node::start(NodeConfig::tls(Verify::None)).await;
        println!("a TLS node answered after {:?}", started.elapsed());
        let tls = node.tls();
        assert!(node.amqps_url().starts_with("amqps://"));

        let address = format!("127.0.0.1:{}", node.port());
        let ca = tls.ca.to_string_lossy();
        let (code, stdout, stderr) = run_command(
            "openssl",
            &["s_client", "-connect", &address, "-CAfile", &ca],
            &[],
        )
        .await;
        assert!(
            stdout.contains("Verify return code: 0 (ok)"),
            "s_client exited with {code}:\n{stdout}\n{stderr}"
        );

        let attempt = Instant::now();
        let plain = connect(&format!("amqp://guest:guest@{address}/%2f")).await;
        let took = attempt.elapsed();
        println!("plain AMQP to the TLS port: {plain:?} after {took:?}",);
        let Err(error) = plain else {
            panic!("plain AMQP connected to a TLS port");
        };
        assert!(
            took < CONNECT_LIMIT && !error.starts_with("no answer"),
            "plain AMQP to the TLS port hung: {error}"
        );
    })
    .await;
}

/// connection.start-ok choosing EXTERNAL (empty response), as one frame on channel 0.
fn start_ok_external() -> Vec<u8> {
    let mut payload = vec![0, 10, 0, 11]; // connection.start-ok
    payload.extend(0u32.to_be_bytes()); // client properties: an empty table
    payload.push(8);
    payload.extend(b"EXTERNAL");
    payload.extend(0u32.to_be_bytes()); // response: empty
    payload.push(5);
    payload.extend(b"en_US");
    let mut frame = vec![1, 0, 0];
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(payload);
    frame.push(0xCE);
    frame
}

#[tokio::test(flavor = "multi_thread")]
async fn an_external_auth_node_wants_a_client_certificate() {
    bounded(Duration::from_secs(120), async {
        let started = Instant::now();
        let node = Node::start(NodeConfig::external_auth("amqp-tasks-alice")).await;
        println!(
            "an EXTERNAL-auth node answered after {:?}",
            started.elapsed()
        );
        assert_eq!(node.tls().client_cn, "amqp-tasks-alice");
        assert!(node.amqps_url().ends_with("?auth_mechanism=external"));

        // The handshake with the client certificate completes...
        let args = node.s_client_args(true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = run_command("openssl", &args, &[]).await;
        assert!(
            code == 0 && stdout.contains("Verify return code: 0 (ok)"),
            "s_client with the client certificate exited with {code}:\n{stdout}\n{stderr}"
        );

        // ...and the server then speaks AMQP and logs the CN's user in with EXTERNAL: tune.
        let mut quiet = node.s_client_args(true);
        quiet.push("-quiet".into());
        let login = openssl(
            quiet,
            [&AMQP_HEADER[..], &start_ok_external()].concat(),
            |out| amqp_methods(out).len() >= 2,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            amqp_methods(&login.stdout),
            [(10, 10), (10, 30)],
            "expected connection.start then connection.tune: {login:?}"
        );

        // Without it, the server refuses (TLS 1.3: with an alert right after the handshake).
        let mut quiet = node.s_client_args(false);
        quiet.push("-quiet".into());
        let refused = openssl(
            quiet,
            AMQP_HEADER.to_vec(),
            |out| !amqp_methods(out).is_empty(),
            Duration::from_secs(10),
        )
        .await;
        println!("without a client certificate: {}", refused.stderr.trim());
        assert!(
            !refused.matched && refused.code.is_some_and(|c| c != 0),
            "the server talked to a client without a certificate: {refused:?}"
        );
        assert!(
            refused.stderr.contains("certificate required")
                || refused.stderr.contains("handshake failure"),
            "{refused:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quorum_queue_outlives_a_killed_cluster_node() {
    bounded(Duration::from_secs(240), async {
        let started = Instant::now();
        let cluster = Cluster::start(3).await;
        println!("three nodes started and joined in {:?}", started.elapsed());
        let names: Vec<&str> = cluster.nodes().iter().map(Node::name).collect();
        let status = cluster.node(0).rabbitmqctl(&["cluster_status"]).await;
        let running = cluster
            .node(0)
            .running_nodes()
            .await
            .expect("cluster_status");
        for name in &names {
            assert!(
                running.iter().any(|r| r == name),
                "{name} not running:\n{status}"
            );
        }
        let urls = cluster.urls();

        let queue = "failover";
        let connection = connect(&urls[0]).await.expect("connect to node 1");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare a quorum queue");
        let mut confirms = Vec::new();
        for i in 0..100 {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    format!("message {i}").as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack());
        }
        assert_eq!(depth(&urls[1], queue).await, Ok(100), "through node 2");

        cluster.node(0).kill().await;
        drop(connection);
        let killed = Instant::now();
        // What node 2 reported, each change once (during the leader election it may be 0 or an
        // error for a moment).
        let seen = std::sync::Mutex::new(Vec::new());
        wait_for(
            "node 2 to report the 100 messages",
            Duration::from_secs(30),
            || async {
                let now = depth(&urls[1], queue).await;
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&now) {
                    seen.push(now.clone());
                }
                (now == Ok(100)).then_some(())
            },
        )
        .await;
        let seen = seen.into_inner().unwrap();
        println!(
            "node 1 killed: node 2 reported {seen:?} within {:?}",
            killed.elapsed()
        );

        let restarted = Instant::now();
        cluster.node(0).start_again().await;
        let first = cluster.node(0).name().to_owned();
        wait_for("node 1 to rejoin", Duration::from_secs(60), || async {
            let running = cluster.node(1).running_nodes().await.ok()?;
            running.contains(&first).then_some(())
        })
        .await;
        println!(
            "node 1 started again and rejoined in {:?}",
            restarted.elapsed()
        );
        assert_eq!(depth(&urls[0], queue).await, Ok(100), "through node 1");

        let connection = connect(&urls[2]).await.expect("connect to node 3");
        let channel = connection.create_channel().await.expect("channel");
        let deleted = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .expect("delete through node 3");
        assert_eq!(deleted, 100);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_a_dead_test_process_are_swept() {
    bounded(Duration::from_secs(60), async {
        // A folder like a node's, owned by a process that has exited, with a live process of
        // "its node" (a sleep carrying the marker).
        let mut gone = Command::new("true").spawn().expect("spawn true");
        let dead_pid = gone.id();
        gone.wait().expect("wait true");
        // Made aside and renamed into place, so that no sweep sees it half written.
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let base = std::path::Path::new(BASE_DIR);
        let making = base.join(format!(".making-{id}"));
        std::fs::create_dir_all(making.join("mnesia")).expect("create a fake node folder");
        std::fs::write(making.join("owner"), format!("{dead_pid} 1\n")).expect("owner");
        std::fs::write(making.join("ports"), "20001 20002\n").expect("ports");
        let dir = base.join(format!("amqptest-{id}"));
        let mut orphan = Command::new("sleep")
            .arg("300")
            .env(MARKER, &dir)
            .spawn()
            .expect("spawn sleep");
        // `spawn` returns once the child is in `execve`, but its environment shows in /proc only
        // when the kernel has finished loading `sleep`: a sweep that looked before then would see
        // no marked process (this test failed once that way on a loaded machine).
        let wanted = format!("{MARKER}={}", dir.display());
        let environ = format!("/proc/{}/environ", orphan.id());
        wait_for("the orphan's environment", Duration::from_secs(10), || {
            let marked = std::fs::read(&environ)
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()));
            async move { marked.then_some(()) }
        })
        .await;
        std::fs::rename(&making, &dir).expect("put the fake node folder in place");

        sweep_leftovers().await;

        assert!(!dir.exists(), "{} was not swept", dir.display());
        let status = wait_for("the orphan to die", Duration::from_secs(10), || {
            let status = orphan.try_wait().expect("try_wait");
            async move { status }
        })
        .await;
        assert!(!status.success(), "the orphan was killed: {status:?}");
    })
    .await;
}

/// Started as a child process by `a_node_of_a_killed_test_process_is_cleaned_up`: starts a node,
/// prints its folder, and waits to be killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a helper process of another test"]
async fn helper_start_a_node_and_wait() {
    if std::env::var("AMQP_TASKS_NODE_HELPER").is_err() {
        return;
    }
    let node = Node::start(NodeConfig::plain()).await;
    println!(
        "NODE {} {}",
        node.dir().display(),
        node.os_pid().unwrap_or(0)
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_of_a_killed_test_process_is_cleaned_up() {
    bounded(Duration::from_secs(120), async {
        let mut helper = Command::new(std::env::current_exe().expect("this test binary"))
            .args([
                "helper_start_a_node_and_wait",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("AMQP_TASKS_NODE_HELPER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the helper test process");
        let stdout = helper.stdout.take().expect("its stdout");
        let line = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find(|l| l.starts_with("NODE "))
        });
        let line = match tokio::time::timeout(Duration::from_secs(90), line).await {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = helper.kill();
                let _ = helper.wait();
                panic!("the helper did not report its node: {other:?}");
            }
        };
        let mut fields = line.split_whitespace().skip(1);
        let dir = std::path::PathBuf::from(fields.next().expect("folder"));
        let pid: u32 = fields.next().and_then(|p| p.parse().ok()).expect("pid");
        assert!(dir.exists() && pid != 0, "{line}");

        helper.kill().expect("SIGKILL the helper");
        helper.wait().expect("reap the helper");
        let cleaned = Instant::now();
        wait_for(
            "the watchdog to kill the node and delete its folder",
            Duration::from_secs(20),
            || {
                let gone = !dir.exists() && !alive(pid);
                async move { gone.then_some(()) }
            },
        )
        .await;
        println!(
            "the node of a SIGKILLed test process was gone after {:?}",
            cleaned.elapsed()
        );
    })
    .await;
}

#[test]
fn amqp_methods_reads_whole_frames_only() {
    let mut bytes = vec![1, 0, 0, 0, 0, 0, 4, 0, 10, 0, 30, 0xCE];
    bytes.extend([1, 0, 0, 0, 0, 0, 4, 0, 10]);
    assert_eq!(amqp_methods(&bytes), [(10, 30)]);
    assert_eq!(amqp_methods(&start_ok_external()), [(10, 11)]);
    assert!(amqp_methods(b"\x15\x03\x03\x00\x02\x02\x28").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_cannot_start_fails_fast_with_its_log() {
    bounded(Duration::from_secs(90), async {
        let started = Instant::now();
        let config = NodeConfig::plain().conf("no_such_setting.at_all = 1");
        let failed = tokio::spawn(Node::start(config)).await;
        let panic = failed
            .expect_err("a node with a broken config started")
            .into_panic();
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        println!(
            "a broken node failed after {:?}:\n{message}",
            started.elapsed()
        );
        assert!(message.contains("no_such_setting"), "{message}");
    })
    .await;
}
