//! Private RabbitMQ nodes for the end-to-end tests, started beside the machine's shared node
//! (`rabbit@localhost` on 127.0.0.1:5672, which this module never touches).
//!
//! A [`Node`] is a `rabbitmq-server` of its own (run as a child process, so that its output is
//! kept; as root it runs as user `rabbitmq`, with the shared Erlang cookie): a unique name
//! (`amqptest-<8 hex>@localhost`), free ports, and one folder under [`BASE_DIR`] holding its
//! configuration, database, logs, pid file and (for TLS) a throw-away CA with server and client
//! certificates. A [`Cluster`] is several nodes joined to the first one.
//!
//! - **Blocking or not.** Every method that waits (starting, killing, `rabbitmqctl`, probing) is
//!   `async` and runs its blocking work on tokio's blocking pool, so a test's own
//!   `tokio::time::timeout` can still fire. Each of those steps is bounded by itself as well:
//!   `rabbitmqctl` calls are killed after [`CTL_PATIENCE`], a start fails after [`START_PATIENCE`]
//!   with the tail of the node's log in the panic message. Accessors (`amqp_url`, `port`, ...)
//!   return at once. Call them from `#[tokio::test(flavor = "multi_thread")]` tests.
//! - **Clean-up.** Dropping a `Node` (also while unwinding from a panic, or when a timeout drops
//!   the test's future) SIGKILLs every process of the node and deletes its folder. Each node also
//!   has a small watchdog process that does the same if the test process dies without dropping it
//!   (killed by CI, aborted), and every start sweeps the folders whose owning test process is gone.
//! - **Isolation.** Ports are drawn at random in 20000..32000 (below Linux's ephemeral range, never
//!   5672/25672), checked by binding, and recorded in the node's folder; the choice is made under
//!   an exclusive lock on `BASE_DIR/.lock`, so parallel tests (and test processes) never pick the
//!   same port. The machine's `/etc/rabbitmq/rabbitmq-env.conf` is replaced by the node's own
//!   (`RABBITMQ_CONF_ENV_FILE`): `RABBITMQ_*` variables set in that file would override the
//!   environment given to `rabbitmq-server`.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where every node's folder lives: `BASE_DIR/<node short name>`.
pub const BASE_DIR: &str = "/tmp/amqp-tasks-nodes";
/// How long a node may take to answer after `rabbitmq-server` (or `start_app`) was run.
pub const START_PATIENCE: Duration = Duration::from_secs(60);
/// How long one `rabbitmqctl` call may take before it is killed.
pub const CTL_PATIENCE: Duration = Duration::from_secs(60);
/// The AMQP 0-9-1 protocol header a client sends first.
pub const AMQP_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Set this environment variable to keep the folders of dropped nodes (their processes are
/// killed all the same), to read their logs; the next start's sweep deletes them.
pub const KEEP: &str = "AMQP_TASKS_KEEP_NODES";
/// The environment variable set on every process of a node (value: the node's folder), by which
/// the clean-up finds them again.
pub const MARKER: &str = "AMQP_TASKS_NODE_DIR";
const PORTS: std::ops::Range<u16> = 20000..32000;
const POLL: Duration = Duration::from_millis(100);
/// How long a killed process may take to disappear.
const DEATH_PATIENCE: Duration = Duration::from_secs(15);

/// What a client must present to a TLS node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// `ssl_options.verify = verify_none`: no client certificate asked for.
    None,
    /// `verify_peer` + `fail_if_no_peer_cert = true`: the handshake needs a client certificate
    /// signed by the node's CA.
    Peer,
}

/// How to configure a node. [`NodeConfig::plain`] is the default.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    tls: Option<Verify>,
    external_cn: Option<String>,
    conf: Vec<String>,
    plugins: Vec<String>,
}

impl NodeConfig {
    /// A plain AMQP listener on 127.0.0.1 only; user guest/guest (loopback connections only, as
    /// RabbitMQ's default).
    pub fn plain() -> NodeConfig {
        NodeConfig::default()
    }

    /// A TLS listener only (`listeners.tcp = none`), with a throw-away CA and a server certificate
    /// for `localhost` and `127.0.0.1`; guest/guest over TLS. A client certificate (CN
    /// `amqp-tasks-test-client`) is made too.
    pub fn tls(verify: Verify) -> NodeConfig {
        NodeConfig {
            tls: Some(verify),
            ..NodeConfig::default()
        }
    }

    /// TLS with `verify_peer`, and EXTERNAL as the only SASL mechanism (plugin
    /// `rabbitmq_auth_mechanism_ssl`, `ssl_cert_login_from = common_name`): the client
    /// certificate's CN is `cn`, and a user of that name (no password) has every permission on
    /// `/`. The node's users come from definitions loaded at boot, so there is no guest user.
    pub fn external_auth(cn: &str) -> NodeConfig {
        NodeConfig {
            tls: Some(Verify::Peer),
            external_cn: Some(cn.to_owned()),
            ..NodeConfig::default()
        }
    }

    /// Adds a line to the node's `rabbitmq.conf` (new-style `key = value`).
    pub fn conf(mut self, line: impl Into<String>) -> NodeConfig {
        self.conf.push(line.into());
        self
    }

    /// Enables one more plugin (it must ship with the machine's RabbitMQ).
    pub fn plugin(mut self, name: impl Into<String>) -> NodeConfig {
        self.plugins.push(name.into());
        self
    }
}

/// The files of a TLS node's throw-away PKI (all PEM).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The client certificate's common name (the EXTERNAL user, if any).
    pub client_cn: String,
}

/// A private RabbitMQ node, stopped and deleted when dropped.
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    /// `amqptest-<8 hex>` (the node is `<short>@localhost`).
    short: String,
    name: String,
    dir: PathBuf,
    port: u16,
    dist_port: u16,
    config: NodeConfig,
    tls: Option<TlsFiles>,
    watchdog: Mutex<Option<Child>>,
    /// The `rabbitmq-server` of the current run (a foreground process: `su` -> `sh` -> beam).
    server: Mutex<Option<Child>>,
}

impl Node {
    /// Starts a node and waits until it answers the AMQP protocol header (over TLS for a TLS
    /// node), for at most [`START_PATIENCE`]; panics with its log tail otherwise.
    pub async fn start(config: NodeConfig) -> Node {
        blocking(move || Node::start_blocking(config)).await
    }

    /// [`Node::start`], blocking the calling thread.
    pub fn start_blocking(config: NodeConfig) -> Node {
        let inner = Arc::new(Inner::create(config));
        let node = Node { inner };
        node.inner.arm_watchdog();
        if let Err(e) = node.inner.prepare() {
            panic!("preparing node {}: {e}", node.inner.name);
        }
        node.inner.boot();
        node
    }

    /// The node's name, `amqptest-<8 hex>@localhost` (for `rabbitmqctl -n`, `join_cluster`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its client port on 127.0.0.1 (the TLS port for a TLS node).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// Its Erlang distribution port.
    pub fn dist_port(&self) -> u16 {
        self.inner.dist_port
    }

    /// Its folder (configuration, `mnesia/`, `log/`, `tls/`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`. Panics for a TLS node (use
    /// [`Node::amqps_url`], or build a plain URL from [`Node::port`] on purpose).
    pub fn amqp_url(&self) -> String {
        assert!(
            self.inner.tls.is_none(),
            "node {} has a TLS listener only: use amqps_url()",
            self.inner.name
        );
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.inner.port)
    }

    /// `amqps://guest:guest@localhost:<port>/%2f`, or with EXTERNAL auth
    /// `amqps://localhost:<port>/%2f?auth_mechanism=external`. The client must trust
    /// [`TlsFiles::ca`] (and present the client certificate for [`Verify::Peer`]). Panics for a
    /// plain node.
    pub fn amqps_url(&self) -> String {
        assert!(
            self.inner.tls.is_some(),
            "node {} has no TLS listener: use amqp_url()",
            self.inner.name
        );
        if self.inner.config.external_cn.is_some() {
            format!(
                "amqps://localhost:{}/%2f?auth_mechanism=external",
                self.inner.port
            )
        } else {
            format!("amqps://guest:guest@localhost:{}/%2f", self.inner.port)
        }
    }

    /// The CA, certificates and keys of a TLS node. Panics for a plain node.
    pub fn tls(&self) -> &TlsFiles {
        self.inner
            .tls
            .as_ref()
            .unwrap_or_else(|| panic!("node {} has no TLS listener", self.inner.name))
    }

    /// `openssl` arguments for an `s_client` to this node that checks its certificate
    /// (`-verify_return_error`), with the client certificate or without.
    pub fn s_client_args(&self, client_cert: bool) -> Vec<String> {
        self.inner.s_client_args(client_cert)
    }

    /// The node's log file.
    pub fn log_file(&self) -> PathBuf {
        self.inner.log_file()
    }

    /// The first errors and the last `lines` lines of its log and of `rabbitmq-server`'s own
    /// output. After a [`Node::kill`], the log lacks what the node wrote in its last seconds
    /// (RabbitMQ buffers it).
    pub fn log_tail(&self, lines: usize) -> String {
        self.inner.log_tail(lines)
    }

    /// The OS pid in its pid file, if the process is alive.
    pub fn os_pid(&self) -> Option<u32> {
        self.inner.os_pid()
    }

    /// Whether it answers the AMQP protocol header (over TLS for a TLS node) right now.
    pub async fn answers(&self) -> bool {
        let inner = self.inner.clone();
        blocking(move || inner.answers()).await
    }

    /// SIGKILLs the node's OS process (from its pid file), simulating a crash, and waits until it
    /// is gone.
    pub async fn kill(&self) {
        let inner = self.inner.clone();
        blocking(move || inner.kill()).await
    }

    /// Starts the node again after [`Node::kill`] or [`Node::stop`]: same name, folders and ports
    /// (a cluster member rejoins its cluster by itself). Waits until it answers, like
    /// [`Node::start`].
    pub async fn start_again(&self) {
        let inner = self.inner.clone();
        blocking(move || {
            let running = inner.beam_pid();
            assert!(
                running.is_none(),
                "node {} is still running (pid {running:?}): kill() or stop() it first",
                inner.name
            );
            inner.boot();
        })
        .await
    }

    /// Stops the whole node gracefully (`rabbitmqctl shutdown`) and waits until its process is
    /// gone.
    pub async fn stop(&self) {
        let inner = self.inner.clone();
        blocking(move || {
            let pid = inner.os_pid();
            inner.ctl_or_panic(&["shutdown"]);
            if let Some(pid) = pid {
                inner.wait_gone(pid);
            }
            inner.reap_server(Duration::from_secs(5));
        })
        .await
    }

    /// Makes the node's metadata (queues, exchanges, bindings, users) crash-proof now, by
    /// dumping Mnesia's transaction log into its table files (`mnesia:dump_log()`).
    ///
    /// Without it, a durable queue declared shortly before a [`Node::kill`] can be missing after
    /// [`Node::start_again`]: here, a queue declared 0.5 to 1 s before the SIGKILL was gone in 3
    /// of 26 tries, although its record was already in Mnesia's `LATEST.LOG` (never in 12 tries
    /// after a dump). Confirmed persistent messages are not concerned; their queue is.
    pub async fn flush_metadata(&self) {
        let out = self.rabbitmqctl(&["eval", "mnesia:dump_log()."]).await;
        assert_eq!(out.trim(), "dumped", "mnesia:dump_log() on {}", self.name());
    }

    /// `rabbitmqctl stop_app`: the Erlang node keeps running, RabbitMQ (and its listeners) stop.
    pub async fn stop_app(&self) {
        self.rabbitmqctl(&["stop_app"]).await;
    }

    /// `rabbitmqctl start_app`, then waits until the node answers again.
    pub async fn start_app(&self) {
        let inner = self.inner.clone();
        blocking(move || {
            inner.ctl_or_panic(&["start_app"]);
            inner.wait_ready();
        })
        .await
    }

    /// Runs `rabbitmqctl -n <node> <args>` (killed after [`CTL_PATIENCE`]) and returns its
    /// stdout; panics if it fails.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> String {
        let inner = self.inner.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            inner.ctl_or_panic(&args)
        })
        .await
    }

    /// Runs `rabbitmqctl -n <node> <args>`: its stdout, or what went wrong (exit code, output,
    /// timeout).
    pub async fn try_rabbitmqctl(&self, args: &[&str]) -> Result<String, String> {
        let inner = self.inner.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            inner.ctl(&args, CTL_PATIENCE)
        })
        .await
    }

    /// The running nodes of its cluster, as this node sees them (`cluster_status`); `Err` if the
    /// node does not answer `rabbitmqctl`.
    pub async fn running_nodes(&self) -> Result<Vec<String>, String> {
        let json = self
            .try_rabbitmqctl(&["cluster_status", "--formatter", "json"])
            .await?;
        let status: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| format!("cluster_status output: {e}: {json}"))?;
        Ok(status["running_nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("port", &self.inner.port)
            .field("dist_port", &self.inner.dist_port)
            .field("tls", &self.inner.tls.is_some())
            .finish()
    }
}

/// Several nodes in one RabbitMQ cluster, every one a disc node.
pub struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` plain nodes at once, then joins the 2nd, 3rd, ... to the 1st, one after the
    /// other (`stop_app`, `join_cluster <first>`, `start_app`), and waits until the first lists
    /// them all as running.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, NodeConfig::plain()).await
    }

    /// [`Cluster::start`] with nodes of this configuration.
    pub async fn start_with(n: usize, config: NodeConfig) -> Cluster {
        assert!(n >= 1, "a cluster needs a node");
        let starting: Vec<_> = (0..n)
            .map(|_| tokio::spawn(Node::start(config.clone())))
            .collect();
        let mut nodes = Vec::with_capacity(n);
        let mut failure = None;
        for start in starting {
            // Await them all, so that none is left behind when one fails.
            match start.await {
                Ok(node) => nodes.push(node),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            drop(nodes);
            match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("starting a cluster node: {e}"),
            }
        }
        let cluster = Cluster { nodes };
        let first = cluster.nodes[0].name().to_owned();
        for node in &cluster.nodes[1..] {
            node.stop_app().await;
            node.rabbitmqctl(&["join_cluster", &first]).await;
            node.start_app().await;
        }
        let names: HashSet<String> = cluster.nodes.iter().map(|n| n.name().to_owned()).collect();
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            let running = cluster.nodes[0].running_nodes().await;
            if let Ok(running) = &running
                && names.iter().all(|n| running.contains(n))
            {
                return cluster;
            }
            if Instant::now() >= deadline {
                panic!("the cluster did not form within {START_PATIENCE:?}: {running:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The `i`th node (0-based: node 1 of the cluster is `node(0)`).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Every node's [`Node::amqp_url`], in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::amqp_url).collect()
    }
}

/// What an `openssl` run printed.
#[derive(Debug)]
pub struct OpensslRun {
    /// Its exit code; `None` if it was still running when stopped (after `until` matched, or at
    /// the limit), or died of a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// Whether `until` matched its stdout.
    pub matched: bool,
}

/// Runs `openssl <args>`, writes `input` to its stdin and keeps stdin open until it exits by
/// itself, `until` matches what it printed on stdout, or `limit` passes; then it is killed. With
/// `s_client -quiet`, stdout is the raw bytes the server sent.
pub async fn openssl(
    args: Vec<String>,
    input: Vec<u8>,
    until: fn(&[u8]) -> bool,
    limit: Duration,
) -> OpensslRun {
    blocking(move || openssl_blocking(&args, &input, until, limit)).await
}

/// The (class, method) ids of the AMQP method frames in `bytes` (which start at a frame
/// boundary), as far as they are complete: `(10, 10)` is connection.start, `(10, 30)`
/// connection.tune, `(10, 50)` connection.close.
pub fn amqp_methods(bytes: &[u8]) -> Vec<(u16, u16)> {
    let mut methods = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 7 {
        let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
        let Some(frame) = rest.get(..7 + size + 1) else {
            break;
        };
        if frame[7 + size] != 0xCE {
            break;
        }
        if frame[0] == 1 && size >= 4 {
            methods.push((
                u16::from_be_bytes([frame[7], frame[8]]),
                u16::from_be_bytes([frame[9], frame[10]]),
            ));
        }
        rest = &rest[7 + size + 1..];
    }
    methods
}

// ---------------------------------------------------------------------------------------------
// The blocking implementation.

impl Inner {
    /// Sweeps leftovers, picks a name and ports and creates the folder, all under the lock.
    fn create(config: NodeConfig) -> Inner {
        let base = Path::new(BASE_DIR);
        check_prerequisites();
        fs::create_dir_all(base).unwrap_or_else(|e| panic!("create {BASE_DIR}: {e}"));
        // User rabbitmq must reach its folders, whatever the umask.
        let _ = fs::set_permissions(base, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        let _lock = lock(&base.join(".lock"));
        let mut taken = sweep(base);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let short = format!("amqptest-{}", &id[..8]);
        let dir = base.join(&short);
        let port = free_port(&mut taken);
        let dist_port = free_port(&mut taken);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        write_atomically(&dir.join("ports"), &format!("{port} {dist_port}\n"));
        // The owner last: a folder with an owner is complete enough to be swept.
        let me = std::process::id();
        let owner = format!("{me} {}\n", start_time(me).unwrap_or_default());
        write_atomically(&dir.join("owner"), &owner);
        let tls = config.tls.map(|_| {
            let tls = dir.join("tls");
            TlsFiles {
                ca: tls.join("ca.pem"),
                server_cert: tls.join("server.pem"),
                server_key: tls.join("server.key"),
                client_cert: tls.join("client.pem"),
                client_key: tls.join("client.key"),
                client_cn: config
                    .external_cn
                    .clone()
                    .unwrap_or_else(|| "amqp-tasks-test-client".to_owned()),
            }
        });
        Inner {
            name: format!("{short}@localhost"),
            short,
            dir,
            port,
            dist_port,
            config,
            tls,
            watchdog: Mutex::new(None),
            server: Mutex::new(None),
        }
    }

    /// A process that kills the node and deletes its folder when the test process dies without
    /// dropping it (its stdin closes without the word `disarm`).
    fn arm_watchdog(&self) {
        let script = r#"read word
[ "$word" = disarm ] && exit 0
for p in /proc/[0-9]*; do
  if tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qxF "$1=$2"; then kill -9 "${p#/proc/}" 2>/dev/null; fi
done
rm -rf "$2""#;
        let child = Command::new("sh")
            .args(["-c", script, "watchdog", MARKER])
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not in the test's process group: a Ctrl-C there must not kill the watchdog too.
            .process_group(0)
            .spawn();
        match child {
            Ok(child) => *lock_ignoring_poison(&self.watchdog) = Some(child),
            Err(e) => eprintln!("node {}: no watchdog ({e})", self.name),
        }
    }

    /// Writes the configuration (and the certificates) and gives the folder to user `rabbitmq`.
    fn prepare(&self) -> Result<(), String> {
        let dir = &self.dir;
        for sub in ["mnesia", "log"] {
            fs::create_dir(dir.join(sub)).map_err(|e| format!("create {sub}: {e}"))?;
        }
        let mut conf = vec!["# written by amqp-tasks-tests::node".to_owned()];
        let mut plugins = self.config.plugins.clone();
        match (&self.tls, self.config.tls) {
            (Some(tls), Some(verify)) => {
                self.make_certificates(tls)?;
                conf.extend([
                    "listeners.tcp = none".to_owned(),
                    format!("listeners.ssl.default = 127.0.0.1:{}", self.port),
                    format!("ssl_options.cacertfile = {}", tls.ca.display()),
                    format!("ssl_options.certfile = {}", tls.server_cert.display()),
                    format!("ssl_options.keyfile = {}", tls.server_key.display()),
                ]);
                conf.extend(match verify {
                    Verify::None => [
                        "ssl_options.verify = verify_none".to_owned(),
                        "ssl_options.fail_if_no_peer_cert = false".to_owned(),
                    ],
                    Verify::Peer => [
                        "ssl_options.verify = verify_peer".to_owned(),
                        "ssl_options.fail_if_no_peer_cert = true".to_owned(),
                    ],
                });
                if let Some(cn) = &self.config.external_cn {
                    plugins.push("rabbitmq_auth_mechanism_ssl".to_owned());
                    conf.extend([
                        "auth_mechanisms.1 = EXTERNAL".to_owned(),
                        "ssl_cert_login_from = common_name".to_owned(),
                        format!(
                            "load_definitions = {}",
                            dir.join("definitions.json").display()
                        ),
                    ]);
                    let definitions = serde_json::json!({
                        "vhosts": [{"name": "/"}],
                        "users": [{
                            "name": cn,
                            "password_hash": "",
                            "hashing_algorithm": "rabbit_password_hashing_sha256",
                            "tags": [],
                        }],
                        "permissions": [{
                            "user": cn, "vhost": "/",
                            "configure": ".*", "write": ".*", "read": ".*",
                        }],
                    });
                    write(&dir.join("definitions.json"), &definitions.to_string())?;
                }
            }
            _ => conf.push(format!("listeners.tcp.local = 127.0.0.1:{}", self.port)),
        }
        conf.extend(self.config.conf.iter().cloned());
        write(&dir.join("rabbitmq.conf"), &(conf.join("\n") + "\n"))?;
        write(
            &dir.join("enabled_plugins"),
            &format!("[{}].\n", plugins.join(",")),
        )?;
        // Its own env file instead of /etc/rabbitmq/rabbitmq-env.conf: the same settings as the
        // environment (see `server_env`), and a wider port range for concurrent rabbitmqctl calls.
        let mut env_file = String::from("# written by amqp-tasks-tests::node\n");
        for (key, value) in self.server_env() {
            if let Some(key) = key.strip_prefix("RABBITMQ_") {
                env_file.push_str(&format!("{key}=\"{value}\"\n"));
            }
        }
        env_file.push_str(
            "ERL_EPMD_ADDRESS=127.0.0.1\n\
             CTL_ERL_ARGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n\
             CTL_DIST_PORT_MAX=35772\n",
        );
        write(&dir.join("rabbitmq-env.conf"), &env_file)?;
        let (code, _, stderr) = run_bounded(
            Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(dir),
            Duration::from_secs(30),
            dir,
        )?;
        if code != Some(0) {
            return Err(format!("chown -R rabbitmq {}: {stderr}", dir.display()));
        }
        Ok(())
    }

    /// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate,
    /// all P-256, valid for two days.
    fn make_certificates(&self, tls: &TlsFiles) -> Result<(), String> {
        let folder = self.dir.join("tls");
        fs::create_dir(&folder).map_err(|e| format!("create tls: {e}"))?;
        let cnf = folder.join("openssl.cnf");
        write(
            &cnf,
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n\
             [ca_ext]\nbasicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
             [server_ext]\nbasicConstraints = CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost,IP:127.0.0.1\n\
             authorityKeyIdentifier = keyid\n\
             [client_ext]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = clientAuth\nauthorityKeyIdentifier = keyid\n",
        )?;
        let p = |path: &Path| path.to_string_lossy().into_owned();
        let ca_key = p(&folder.join("ca.key"));
        let cnf = p(&cnf);
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        let owned = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
        let mut steps = vec![
            [
                owned(&["req", "-x509", "-config", &cnf, "-extensions", "ca_ext"]),
                owned(&ec.split(' ').collect::<Vec<_>>()),
                owned(&["-keyout", &ca_key, "-out", &p(&tls.ca), "-days", "2"]),
                owned(&["-subj", &format!("/CN=amqp-tasks test CA {}", self.short)]),
            ]
            .concat(),
        ];
        let client_subject = format!("/CN={}", tls.client_cn);
        for (cert, key, subject, extensions, serial) in [
            (
                &tls.server_cert,
                &tls.server_key,
                "/CN=localhost",
                "server_ext",
                "2",
            ),
            (
                &tls.client_cert,
                &tls.client_key,
                &client_subject[..],
                "client_ext",
                "3",
            ),
        ] {
            let csr = p(&cert.with_extension("csr"));
            steps.push(
                [
                    owned(&["req", "-new", "-config", &cnf]),
                    owned(&ec.split(' ').collect::<Vec<_>>()),
                    owned(&["-keyout", &p(key), "-out", &csr, "-subj", subject]),
                ]
                .concat(),
            );
            steps.push(owned(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &p(&tls.ca),
                "-CAkey",
                &ca_key,
                "-set_serial",
                serial,
                "-days",
                "2",
                "-extfile",
                &cnf,
                "-extensions",
                extensions,
                "-out",
                &p(cert),
            ]));
        }
        for args in steps {
            let (code, _, stderr) = run_bounded(
                Command::new("openssl").args(&args),
                Duration::from_secs(30),
                &self.dir,
            )?;
            if code != Some(0) {
                return Err(format!("openssl {args:?} failed: {stderr}"));
            }
        }
        Ok(())
    }

    /// The environment of `rabbitmq-server` for this node.
    fn server_env(&self) -> Vec<(String, String)> {
        let path = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
        vec![
            ("RABBITMQ_NODENAME".into(), self.name.clone()),
            ("RABBITMQ_NODE_PORT".into(), self.port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), self.dist_port.to_string()),
            ("RABBITMQ_CONFIG_FILE".into(), path("rabbitmq.conf")),
            // Never written: no advanced.config is read from /etc/rabbitmq.
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE".into(),
                path("advanced.config"),
            ),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                path("enabled_plugins"),
            ),
            ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), path("log")),
            ("RABBITMQ_PID_FILE".into(), path("pid")),
            // What the machine's env file gave through ERL_FLAGS: distribution on loopback only.
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".into(),
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
        ]
    }

    /// A command with this node's environment: nothing inherited from RABBITMQ_* or ERL_*
    /// variables of the test process, the node's own env file, and the marker.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("RABBITMQ_") || key.starts_with("ERL_") {
                command.env_remove(key.as_ref());
            }
        }
        command
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // Not in the working directory the wrapper chooses: /var/lib/rabbitmq.
            .env("ERL_CRASH_DUMP", self.dir.join("erl_crash.dump"))
            .env(MARKER, &self.dir);
        command
    }

    /// Runs `rabbitmq-server` and waits until the node answers; panics with its log tail
    /// otherwise. The server runs in the foreground, as a child process whose output goes to
    /// `startup.out`/`startup.err`: with `-detached`, the errors of an early boot failure (a bad
    /// configuration) are lost.
    fn boot(&self) {
        self.reap_server(Duration::from_secs(5));
        let mut command = self.command("rabbitmq-server");
        command.envs(self.server_env());
        let spawned = output_files(&self.dir.join("startup")).and_then(|(out, err)| {
            command
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .spawn()
                .map_err(|e| format!("spawn rabbitmq-server: {e}"))
        });
        match spawned {
            Ok(child) => *lock_ignoring_poison(&self.server) = Some(child),
            Err(e) => panic!("node {}: {e}", self.name),
        }
        self.wait_ready();
    }

    /// Waits until the node answers, for at most [`START_PATIENCE`]; fails early if its
    /// processes are gone.
    fn wait_ready(&self) {
        let started = Instant::now();
        let mut missing = 0;
        loop {
            if self.answers() {
                return;
            }
            let exited = lock_ignoring_poison(&self.server)
                .as_mut()
                .and_then(|server| server.try_wait().ok().flatten());
            if self.pids().is_empty() {
                missing += 1;
            } else {
                missing = 0;
            }
            let problem = if let Some(status) = exited {
                Some(format!("rabbitmq-server exited ({status})"))
            } else if missing >= 5 {
                Some("its processes exited".to_owned())
            } else if started.elapsed() >= START_PATIENCE {
                Some(format!("it did not answer within {START_PATIENCE:?}"))
            } else {
                None
            };
            if let Some(problem) = problem {
                panic!(
                    "node {} (port {}): {problem}\n{}",
                    self.name,
                    self.port,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the `rabbitmq-server` child of the last run to exit (it does once the node's
    /// VM is gone), killing it after `limit`.
    fn reap_server(&self, limit: Duration) {
        if let Some(server) = lock_ignoring_poison(&self.server).take() {
            let _ = wait_bounded(server, limit);
        }
    }

    fn answers(&self) -> bool {
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
            return false;
        };
        if self.tls.is_some() {
            drop(stream);
            let mut args = self.s_client_args(true);
            args.push("-quiet".into());
            let until: fn(&[u8]) -> bool = if self.config.external_cn.is_some() {
                // The mechanism plugin is running once EXTERNAL is offered.
                |out| {
                    amqp_methods(out).contains(&(10, 10))
                        && out.windows(8).any(|w| w == b"EXTERNAL")
                }
            } else {
                |out| amqp_methods(out).contains(&(10, 10))
            };
            return openssl_blocking(&args, AMQP_HEADER, until, Duration::from_secs(5)).matched;
        }
        let timeout = Some(Duration::from_secs(2));
        if stream.set_read_timeout(timeout).is_err()
            || stream.set_write_timeout(timeout).is_err()
            || stream.write_all(AMQP_HEADER).is_err()
        {
            return false;
        }
        let mut frame = [0u8; 11];
        stream.read_exact(&mut frame).is_ok() && frame[0] == 1 && frame[7..11] == [0, 10, 0, 10]
    }

    fn s_client_args(&self, client_cert: bool) -> Vec<String> {
        let tls = self
            .tls
            .as_ref()
            .unwrap_or_else(|| panic!("node {} has no TLS listener", self.name));
        let mut args: Vec<String> = vec![
            "s_client".into(),
            "-connect".into(),
            format!("127.0.0.1:{}", self.port),
            "-servername".into(),
            "localhost".into(),
            "-CAfile".into(),
            tls.ca.to_string_lossy().into_owned(),
            "-verify_return_error".into(),
        ];
        if client_cert {
            args.extend([
                "-cert".into(),
                tls.client_cert.to_string_lossy().into_owned(),
                "-key".into(),
                tls.client_key.to_string_lossy().into_owned(),
            ]);
        }
        args
    }

    fn ctl(&self, args: &[&str], limit: Duration) -> Result<String, String> {
        let mut command = self.command("rabbitmqctl");
        command.arg("-n").arg(&self.name).args(args);
        let (code, stdout, stderr) = run_bounded(&mut command, limit, &self.dir)?;
        match code {
            Some(0) => Ok(stdout),
            _ => Err(format!(
                "rabbitmqctl -n {} {args:?} exited with {code:?}: {stderr}{stdout}",
                self.name
            )),
        }
    }

    fn ctl_or_panic(&self, args: &[&str]) -> String {
        self.ctl(args, CTL_PATIENCE)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail(20)))
    }

    fn kill(&self) {
        let pid = self
            .beam_pid()
            .unwrap_or_else(|| panic!("node {} is not running", self.name));
        signal_kill(pid);
        self.wait_gone(pid);
        self.reap_server(Duration::from_secs(5));
    }

    fn wait_gone(&self, pid: u32) {
        let deadline = Instant::now() + DEATH_PATIENCE;
        while alive(pid) {
            if Instant::now() >= deadline {
                panic!(
                    "node {} (pid {pid}) still alive after {DEATH_PATIENCE:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid in the pid file, if that process is alive and belongs to this node.
    fn os_pid(&self) -> Option<u32> {
        let pid = fs::read_to_string(self.dir.join("pid")).ok()?;
        let pid = pid.trim().parse().ok()?;
        (alive(pid) && has_marker(pid, &self.dir)).then_some(pid)
    }

    /// The node's Erlang VM: the pid file's process, or (before it is written) a `beam.smp`
    /// with the marker.
    fn beam_pid(&self) -> Option<u32> {
        self.os_pid().or_else(|| {
            self.pids().into_iter().find(|pid| {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim().starts_with("beam"))
            })
        })
    }

    /// Every live process of this node.
    fn pids(&self) -> Vec<u32> {
        marked_pids(&self.dir)
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut tail = String::new();
        for (what, path) in [
            ("rabbitmq-server stdout", self.dir.join("startup.out")),
            ("rabbitmq-server stderr", self.dir.join("startup.err")),
            ("log", self.log_file()),
        ] {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            if all.is_empty() {
                continue;
            }
            // The first errors tell the cause; the tail what happened last.
            let errors: Vec<&str> = all
                .iter()
                .filter(|line| line.contains("[error]"))
                .take(10)
                .copied()
                .collect();
            if !errors.is_empty() && all.len() > lines {
                tail.push_str(&format!(
                    "--- {what} ({}), first errors:\n{}\n",
                    path.display(),
                    errors.join("\n")
                ));
            }
            let from = all.len().saturating_sub(lines);
            tail.push_str(&format!(
                "--- {what} ({}), last {} lines:\n{}\n",
                path.display(),
                all.len() - from,
                all[from..].join("\n")
            ));
        }
        if tail.is_empty() {
            tail.push_str("(the node wrote no log)");
        }
        tail
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SIGKILL everything of the node, wait for it, delete the folder; never panic here.
        let deadline = Instant::now() + DEATH_PATIENCE;
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() >= deadline {
                break;
            }
            pids.into_iter().for_each(signal_kill);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reap_server(Duration::from_secs(1));
        if std::env::var_os(KEEP).is_some() {
            eprintln!(
                "node {}: kept {} ({KEEP} is set)",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        let watchdog = self.watchdog.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(mut watchdog) = watchdog.take() {
            if let Some(mut stdin) = watchdog.stdin.take() {
                let _ = stdin.write_all(b"disarm\n");
            }
            let _ = wait_bounded(watchdog, Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes, ports, files.

/// Panics with what is missing unless this process is root and RabbitMQ is installed here.
fn check_prerequisites() {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        == Some("0");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let installed = |program: &str| std::env::split_paths(&path).any(|d| d.join(program).is_file());
    let missing: Vec<&str> = ["rabbitmq-server", "rabbitmqctl", "openssl"]
        .into_iter()
        .filter(|program| !installed(program))
        .collect();
    assert!(
        root && missing.is_empty(),
        "private RabbitMQ nodes need root and a local RabbitMQ install (root: {root}, not on \
         PATH: {missing:?})"
    );
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a blocking closure on tokio's blocking pool, passing its panic on.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("a blocking node operation was cancelled: {e}"),
        },
    }
}

/// An exclusive lock on `path`, waited for at most 60 s.
fn lock(path: &Path) -> fs::File {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match file.try_lock() {
            Ok(()) => return file,
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("lock {}: {e}", path.display()),
        }
    }
}

/// Kills the nodes left under [`BASE_DIR`] by test processes that are gone, and deletes their
/// folders. Every [`Node::start`] does this first.
pub async fn sweep_leftovers() {
    blocking(|| {
        let base = Path::new(BASE_DIR);
        if base.is_dir() {
            let _lock = lock(&base.join(".lock"));
            sweep(base);
        }
    })
    .await
}

/// Deletes the node folders whose owning process is gone (killing their nodes first) and
/// returns the ports of the others.
fn sweep(base: &Path) -> HashSet<u16> {
    let mut taken = HashSet::new();
    let Ok(entries) = fs::read_dir(base) else {
        return taken;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_node = entry.file_type().is_ok_and(|t| t.is_dir())
            && entry.file_name().to_string_lossy().starts_with("amqptest-");
        if !is_node {
            continue;
        }
        let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let mut owner = owner.split_whitespace().map(|f| f.parse::<u64>().ok());
        let live = match (owner.next().flatten(), owner.next().flatten()) {
            (Some(pid), Some(started)) => {
                let pid = pid as u32;
                alive(pid) && start_time(pid) == Some(started)
            }
            _ => false,
        };
        if live {
            let ports = fs::read_to_string(dir.join("ports")).unwrap_or_default();
            taken.extend(
                ports
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u16>().ok()),
            );
            continue;
        }
        let deadline = Instant::now() + DEATH_PATIENCE;
        loop {
            let pids = marked_pids(&dir);
            if pids.is_empty() || Instant::now() >= deadline {
                break;
            }
            pids.into_iter().for_each(signal_kill);
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "amqp-tasks-tests::node: swept {}, left by a test process that is gone",
            dir.display()
        );
        let _ = fs::remove_dir_all(&dir);
    }
    taken
}

/// A random port of [`PORTS`] that no node folder records and that can be bound on 127.0.0.1.
fn free_port(taken: &mut HashSet<u16>) -> u16 {
    let width = u128::from(PORTS.end - PORTS.start);
    for _ in 0..1000 {
        let port = PORTS.start + (uuid::Uuid::new_v4().as_u128() % width) as u16;
        if port == 25672 || taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in {PORTS:?}");
}

/// The start time of a process (field 22 of /proc/<pid>/stat), to tell a reused pid apart.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

fn has_marker(pid: u32, dir: &Path) -> bool {
    let wanted = format!("{MARKER}={}", dir.display());
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
}

/// The live processes whose environment carries the marker of `dir`.
fn marked_pids(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id() && has_marker(*pid, dir) && alive(*pid))
        .collect()
}

fn signal_kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for a child for at most `limit`; kills its process group (or itself) after that.
fn wait_bounded(mut child: Child, limit: Duration) -> Result<Option<i32>, String> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status.code()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let pid = child.id();
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("pid {pid} did not exit within {limit:?}"));
            }
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
}

/// Runs a command in a process group of its own, killed after `limit`, its output collected in
/// files of `scratch`: (exit code, stdout, stderr).
fn run_bounded(
    command: &mut Command,
    limit: Duration,
    scratch: &Path,
) -> Result<(Option<i32>, String, String), String> {
    let base = scratch.join(format!(".cmd-{}", uuid::Uuid::new_v4().simple()));
    let (out, err) = output_files(&base)?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn {:?}: {e}", command.get_program()))?;
    let code = wait_bounded(child, limit);
    let read = |ext: &str| {
        let path = base.with_extension(ext);
        let text = fs::read_to_string(&path).unwrap_or_default();
        let _ = fs::remove_file(&path);
        text
    };
    let (stdout, stderr) = (read("out"), read("err"));
    let code = code.map_err(|e| format!("{:?}: {e}: {stderr}", command.get_program()))?;
    Ok((code, stdout, stderr))
}

/// `<base>.out` and `<base>.err`, for a child's stdout and stderr.
/// Appended to if they exist.
fn output_files(base: &Path) -> Result<(fs::File, fs::File), String> {
    let create = |ext: &str| {
        let path = base.with_extension(ext);
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))
    };
    Ok((create("out")?, create("err")?))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, text)
        .and_then(|()| fs::rename(&temporary, path))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn openssl_blocking(
    args: &[String],
    input: &[u8],
    until: fn(&[u8]) -> bool,
    limit: Duration,
) -> OpensslRun {
    let spawned = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return OpensslRun {
                code: None,
                stdout: Vec::new(),
                stderr: format!("spawn openssl: {e}"),
                matched: false,
            };
        }
    };
    let collect = |stream: Option<Box<dyn Read + Send>>| {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = bytes.clone();
        let reader = std::thread::spawn(move || {
            let Some(mut stream) = stream else { return };
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        });
        (bytes, reader)
    };
    let (stdout, out_reader) = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let (stderr, err_reader) = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let mut stdin = child.stdin.take();
    if let Some(pipe) = stdin.as_mut() {
        let _ = pipe.write_all(input);
        let _ = pipe.flush();
    }
    let deadline = Instant::now() + limit;
    let mut matched = false;
    let mut code = None;
    loop {
        if until(&stdout.lock().unwrap()) {
            matched = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            code = status.code();
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(stdin);
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = out_reader.join();
    let _ = err_reader.join();
    let stdout = std::mem::take(&mut *stdout.lock().unwrap());
    let matched = matched || until(&stdout);
    let stderr = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    OpensslRun {
        code,
        stdout,
        stderr,
        matched,
    }
}
