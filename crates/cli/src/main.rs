//! `tether`: the single binary for the server, the agent, both at once
//! (`up`), and the admin verbs.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use tether_proto::tether::admin_client::AdminClient;
use tether_proto::tether::agent_admin_client::AgentAdminClient;
use tether_proto::tether::{
    ApplyRequest, ConnectionsRequest, CreateJoinTokenRequest, CredentialsRequest, DeleteRequest,
    EventsRequest, GetRequest, ListSvidsRequest, PolicyCheckRequest, RotateCaRequest,
    WhoAmIRequest,
};
use tether_spiffe::{Bundle, TrustDomain};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Process-level workload identity for Linux"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format for daemons.
    #[arg(long, global = true, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

#[derive(Args, Clone)]
struct AdminSock {
    /// The server's admin socket.
    #[arg(
        long,
        env = "TETHER_ADMIN_SOCKET",
        default_value = "/run/tether/admin.sock"
    )]
    admin_socket: PathBuf,
}

#[derive(Args, Clone)]
struct AgentSock {
    /// The agent's admin socket.
    #[arg(
        long,
        env = "TETHER_AGENT_SOCKET",
        default_value = "/run/tether/agent.sock"
    )]
    agent_socket: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Server and agent in one process on this machine: embedded SQLite,
    /// self-signed CA, local sockets. The way to start.
    Up(UpArgs),
    /// The control plane.
    Server(ServerArgs),
    /// The node agent.
    Agent(AgentArgs),
    /// Create or update resources from a YAML file ("-" for stdin).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[command(flatten)]
        sock: AdminSock,
    },
    /// Show resources: workloadidentity (wi), node, bundle.
    Get {
        kind: String,
        name: Option<String>,
        #[command(flatten)]
        sock: AdminSock,
    },
    /// Delete a resource.
    Delete {
        kind: String,
        name: String,
        #[command(flatten)]
        sock: AdminSock,
    },
    /// Join tokens for node attestation.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// CA operations.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Every selector of a process and which identity it matches, or why none.
    Whoami {
        #[arg(long)]
        pid: i32,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sock: AgentSock,
    },
    /// Fetch this process's X.509-SVID from the Workload API (a plain SPIFFE
    /// client, like any workload would use).
    Fetch {
        /// Workload API socket.
        #[arg(
            long,
            env = "SPIFFE_ENDPOINT_SOCKET",
            default_value = "/run/tether/workload.sock"
        )]
        socket: String,
        /// Write svid.pem, key.pem and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Keep the stream open and print every update (rotations).
        #[arg(long)]
        watch: bool,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Audit events: connection decisions and credential reads.
    Events {
        /// Keep streaming new events.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        sock: AgentSock,
    },
    /// Remove every program, link and map the agent attached (works while
    /// the agent is stopped).
    Detach {
        /// The cgroup the agent enforced (none: only what is pinned).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// The agent's bpffs pin directory.
        #[arg(long, default_value = tether_agent::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Per-process SVIDs the agent holds now.
    Svids {
        #[command(flatten)]
        sock: AgentSock,
    },
    /// Live mesh tunnels on this node: local process, SPIFFE IDs of both
    /// ends, TLS version and cipher suite, bytes each way.
    Connections {
        #[command(flatten)]
        sock: AgentSock,
    },
    /// Credential bindings each live process holds, their sources and
    /// expiry (never a value).
    Credentials {
        #[command(flatten)]
        sock: AgentSock,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a single-use join token.
    Create {
        /// Lifetime, e.g. 10m, 1h.
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// Bind the token to this node name.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        sock: AdminSock,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Explain the verdict for a process or identity and a destination.
    Check {
        /// A live process...
        #[arg(long, conflicts_with = "identity")]
        pid: Option<i32>,
        /// ...or a WorkloadIdentity name.
        #[arg(long)]
        identity: Option<String>,
        /// Destination host:port.
        #[arg(long)]
        to: String,
        #[arg(long)]
        udp: bool,
        #[command(flatten)]
        sock: AgentSock,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Rotate the X.509 CA and JWT key: "prepare" publishes the next key in
    /// the bundle; "activate" makes it sign.
    Rotate {
        #[arg(value_parser = ["prepare", "activate"])]
        step: String,
        #[command(flatten)]
        sock: AdminSock,
    },
}

#[derive(Args)]
struct ServerOpts {
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Node API address (TLS).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Operator CA certificate (PEM) to chain to, instead of a self-signed root.
    #[arg(long, requires = "upstream_ca_key")]
    upstream_ca_cert: Option<PathBuf>,
    /// Key (PEM) of --upstream-ca-cert.
    #[arg(long, requires = "upstream_ca_cert")]
    upstream_ca_key: Option<PathBuf>,
    /// The database: a PostgreSQL URL (postgres://user@host:port/db, with
    /// libpq's keywords such as sslmode) that several servers share. Without
    /// it, SQLite in the data directory. The environment keeps a password
    /// out of the process list.
    #[arg(long, env = "TETHER_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// CA certificates (PEM) that verify the database server's TLS
    /// certificate (default: the system's roots).
    #[arg(long, requires = "database")]
    database_ca: Option<PathBuf>,
    /// The key-encryption key (32 bytes, mode 0600, the same file on every
    /// server) that seals CA keys and static secrets in a PostgreSQL
    /// database. Required with --database.
    #[arg(long, requires = "database")]
    kek_file: Option<PathBuf>,
    /// CA certificates (PEM) of the operator's node PKI: an agent holding a
    /// certificate they issued attests by x509pop, without a join token.
    #[arg(long)]
    node_ca: Option<PathBuf>,
    /// This server's name in `tether get nodes` (default: host name and
    /// node API port).
    #[arg(long)]
    server_name: Option<String>,
    /// How often due key rotation steps, and keys another server sharing
    /// the database prepared or activated, are checked.
    #[arg(long, default_value = "30s")]
    key_check: String,
    /// Lifetime of each signing CA, e.g. 7d.
    #[arg(long, default_value = "7d")]
    ca_ttl: String,
    /// Lifetime of node SVIDs.
    #[arg(long, default_value = "1h")]
    node_svid_ttl: String,
    /// Publish the JWT keys for OIDC discovery under this issuer URL
    /// (https://host[:port][/path]); JWT-SVIDs then carry it as `iss`.
    #[arg(long, requires_all = ["oidc_listen", "oidc_tls_cert", "oidc_tls_key"])]
    oidc_issuer: Option<String>,
    /// Address the OIDC discovery endpoint listens on (HTTPS).
    #[arg(long, requires = "oidc_issuer")]
    oidc_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for the issuer's host, from the operator's
    /// web PKI; re-read when the file changes.
    #[arg(long, requires = "oidc_issuer")]
    oidc_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --oidc-tls-cert.
    #[arg(long, requires = "oidc_issuer")]
    oidc_tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct ServerArgs {
    #[command(flatten)]
    opts: ServerOpts,
    #[arg(long, default_value = "/var/lib/tether/server")]
    data_dir: PathBuf,
    #[arg(long, default_value = "/run/tether/admin.sock")]
    admin_socket: PathBuf,
}

#[derive(Args)]
struct AgentOpts {
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Prometheus metrics address; "off" to disable.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: String,
    /// Full /proc rescan interval (repairs missed process events).
    #[arg(long, default_value = "30s")]
    rescan: String,
    /// Enforce connections of processes in this cgroup v2 directory (the
    /// cgroup2 mount point for the whole node).
    #[arg(long)]
    enforce_cgroup: Option<PathBuf>,
    /// bpffs directory to pin programs and maps in, so exec records survive
    /// the agent and protected destinations stay closed while it is down
    /// ("none": pin nothing; a bpffs is mounted at /sys/fs/bpf if needed).
    #[arg(long, default_value = tether_agent::DEFAULT_PIN_DIR)]
    bpf_pin_dir: String,
    /// Audit log (JSON lines) of connection decisions and credential reads.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Where the credential filesystem is mounted ("none": not mounted).
    /// Default: /run/tether/credentials (for `tether up`, RUN_DIR/credentials).
    #[arg(long)]
    credentials_dir: Option<String>,
    /// Loopback port where connections of processes not attested yet are
    /// held while the agent attests them (0: any free port).
    #[arg(long, default_value_t = 0, requires = "enforce_cgroup")]
    hold_port: u16,
    /// Mesh port, the same on every node: accepts mutual-TLS tunnels from
    /// other agents to the Services this node fronts, and is where tunnels
    /// to other nodes go. 0 disables the mesh.
    #[arg(long, default_value_t = tether_agent::DEFAULT_MESH_PORT, requires = "enforce_cgroup")]
    mesh_port: u16,
    /// When the agent runs in a container (with the host's pid
    /// namespace): a process in the host's mount namespace, 1 on a real
    /// host. Its root is the host's view of paths (`process:path`) and its
    /// mount namespace the host's own (the `mount-namespace` exec check).
    /// Default: the agent itself.
    #[arg(long)]
    host_pid: Option<i32>,
    /// Testing only: read the current Unix time for policy conditions from
    /// this file.
    #[arg(long, hide = true)]
    clock_file: Option<PathBuf>,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    opts: AgentOpts,
    /// Server node API, host:port; several, comma-separated (or a name with
    /// several addresses), for a control plane of several servers: the
    /// agent stays with the one that answers and moves to the next when it
    /// does not.
    #[arg(long)]
    server: String,
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// SPIFFE bundle (JSON) used to verify the server at first attestation.
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// Join token (only needed for the first attestation).
    #[arg(long, env = "TETHER_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Attest with this node certificate (PEM chain, leaf first, from the
    /// operator's node CA; its subject CN must be the node name) instead of
    /// a join token.
    #[arg(long, requires = "x509pop_key")]
    x509pop_cert: Option<PathBuf>,
    /// Key (PEM, ECDSA P-256) of --x509pop-cert.
    #[arg(long, requires = "x509pop_cert")]
    x509pop_key: Option<PathBuf>,
    #[arg(long, default_value = "/var/lib/tether/agent")]
    data_dir: PathBuf,
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET_PATH",
        default_value = "/run/tether/workload.sock"
    )]
    workload_socket: PathBuf,
    #[arg(long, default_value = "/run/tether/agent.sock")]
    admin_socket: PathBuf,
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    server: ServerOpts,
    #[command(flatten)]
    agent: AgentOpts,
    /// State: the database (with CA keys) and the agent's node SVID.
    #[arg(long, default_value = "/var/lib/tether")]
    data_dir: PathBuf,
    /// Sockets: workload.sock, admin.sock, agent.sock.
    #[arg(long, default_value = "/run/tether")]
    run_dir: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let daemon = matches!(cli.cmd, Cmd::Up(_) | Cmd::Server(_) | Cmd::Agent(_));
    if daemon {
        init_logging(&cli.log_format);
    } else {
        // A command's output piped into `head` ends it quietly, as for any
        // Unix tool (Rust ignores SIGPIPE, and print! would then panic on
        // EPIPE). Daemons keep ignoring it: a peer closing a socket must
        // not kill them.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli.cmd)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if format == "json" {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

fn duration(what: &str, s: &str) -> anyhow::Result<i64> {
    tether_manifest::parse_duration(s).map_err(|e| anyhow!("{what}: {e}"))
}

fn server_config(
    o: &ServerOpts,
    data_dir: PathBuf,
    admin_socket: PathBuf,
) -> anyhow::Result<tether_server::ServerConfig> {
    let td = TrustDomain::new(&o.trust_domain).map_err(|e| anyhow!("--trust-domain: {e}"))?;
    let mut cfg = tether_server::ServerConfig::new(td, data_dir);
    cfg.listen = o.listen;
    cfg.admin_socket = admin_socket;
    cfg.upstream = o.upstream_ca_cert.clone().zip(o.upstream_ca_key.clone());
    if let Some(url) = &o.database {
        if !tether_server::is_postgres_url(url) {
            bail!("--database: not a postgres:// URL (SQLite, the default, needs no flag)");
        }
        let kek = o.kek_file.clone().ok_or_else(|| {
            anyhow!("--database needs --kek-file: secrets are never stored in clear")
        })?;
        cfg.database = tether_server::Database::Postgres {
            url: url.clone(),
            ca: o.database_ca.clone(),
            kek,
        };
    }
    cfg.name = o.server_name.clone();
    cfg.node_ca = o.node_ca.clone();
    cfg.ca_ttl_secs = duration("--ca-ttl", &o.ca_ttl)?;
    cfg.rotation_check = Duration::from_secs(duration("--key-check", &o.key_check)?.max(1) as u64);
    cfg.node_svid_ttl_secs = duration("--node-svid-ttl", &o.node_svid_ttl)?;
    if let (Some(issuer), Some(listen), Some(cert), Some(key)) = (
        &o.oidc_issuer,
        o.oidc_listen,
        &o.oidc_tls_cert,
        &o.oidc_tls_key,
    ) {
        cfg.oidc = Some(tether_server::OidcConfig {
            issuer: tether_server::Issuer::parse(issuer)
                .map_err(|e| anyhow!("--oidc-issuer: {e}"))?,
            listen,
            cert_pem: cert.clone(),
            key_pem: key.clone(),
        });
    }
    Ok(cfg)
}

fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if name.is_empty() { "node".into() } else { name }
}

fn agent_config(
    o: &AgentOpts,
    server: String,
    td: TrustDomain,
    data_dir: PathBuf,
) -> anyhow::Result<tether_agent::AgentConfig> {
    let node = o.node_name.clone().unwrap_or_else(host_name);
    tether_manifest::validate_name(&node).map_err(|e| anyhow!("--node-name: {e}"))?;
    let mut cfg = tether_agent::AgentConfig::new(server, td, node, data_dir);
    cfg.metrics = if o.metrics == "off" {
        None
    } else {
        Some(
            o.metrics
                .parse()
                .map_err(|e| anyhow!("--metrics {:?}: {e}", o.metrics))?,
        )
    };
    cfg.rescan_interval = Duration::from_secs(duration("--rescan", &o.rescan)?.max(1) as u64);
    cfg.bpf_pin_dir = (o.bpf_pin_dir != "none").then(|| PathBuf::from(&o.bpf_pin_dir));
    if let Some(cg) = &o.enforce_cgroup {
        cfg.enforce = Some(tether_agent::EnforceConfig {
            cgroup: cg.clone(),
            hold_port: o.hold_port,
            mesh_port: (o.mesh_port != 0).then_some(o.mesh_port),
        });
    }
    cfg.audit_log = o.audit_log.clone();
    if let Some(pid) = o.host_pid {
        anyhow::ensure!(pid > 0, "--host-pid must be a process id");
        cfg.host_pid = Some(pid);
    }
    match o.credentials_dir.as_deref() {
        Some("none") => cfg.credentials_dir = None,
        Some(d) => cfg.credentials_dir = Some(PathBuf::from(d)),
        None => {}
    }
    if let Some(f) = &o.clock_file {
        cfg.clock = tether_agent::file_clock(f.clone());
    }
    Ok(cfg)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Up(a) => {
            tether_agent::harden_process();
            let cfg = server_config(
                &a.server,
                a.data_dir.join("server"),
                a.run_dir.join("admin.sock"),
            )?;
            let td = cfg.trust_domain.clone();
            let server = tether_server::start(cfg).await?;
            let mut acfg = agent_config(
                &a.agent,
                server.node_addr.to_string(),
                td,
                a.data_dir.join("agent"),
            )?;
            // The in-process agent attests over the real node API with a
            // token bound to its name, exactly as a remote agent would.
            let (token, _) = server.state.create_join_token(300, Some(&acfg.node_name))?;
            acfg.join_token = Some(token);
            acfg.bootstrap_bundle = Some(server.state.current_bundle());
            acfg.workload_socket = a.run_dir.join("workload.sock");
            acfg.admin_socket = a.run_dir.join("agent.sock");
            if a.agent.credentials_dir.is_none() {
                acfg.credentials_dir = Some(a.run_dir.join("credentials"));
            }
            let agent = tether_agent::start(acfg).await?;
            tracing::info!("tether is up");
            shutdown_signal().await;
            drop(agent);
            drop(server);
            Ok(())
        }
        Cmd::Server(a) => {
            let cfg = server_config(&a.opts, a.data_dir, a.admin_socket)?;
            let _server = tether_server::start(cfg).await?;
            shutdown_signal().await;
            Ok(())
        }
        Cmd::Agent(a) => {
            tether_agent::harden_process();
            let td =
                TrustDomain::new(&a.trust_domain).map_err(|e| anyhow!("--trust-domain: {e}"))?;
            let mut cfg = agent_config(&a.opts, a.server, td.clone(), a.data_dir)?;
            if let Some(p) = &a.trust_bundle {
                let json = std::fs::read(p)
                    .with_context(|| format!("reading --trust-bundle {}", p.display()))?;
                cfg.bootstrap_bundle = Some(
                    Bundle::from_json(td, &json)
                        .with_context(|| format!("--trust-bundle {}", p.display()))?,
                );
            }
            cfg.join_token = a.join_token;
            cfg.x509pop = a.x509pop_cert.zip(a.x509pop_key);
            cfg.workload_socket = a.workload_socket;
            cfg.admin_socket = a.admin_socket;
            let _agent = tether_agent::start(cfg).await?;
            shutdown_signal().await;
            Ok(())
        }
        Cmd::Apply { file, sock } => {
            let (source, bytes) = if file == "-" {
                let mut b = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut b)
                    .context("reading stdin")?;
                ("<stdin>".to_string(), b)
            } else {
                (
                    file.clone(),
                    std::fs::read(&file).with_context(|| format!("reading {file}"))?,
                )
            };
            let resp = admin(&sock.admin_socket)?
                .apply(ApplyRequest {
                    source,
                    manifest: bytes,
                })
                .await
                .map_err(status)?
                .into_inner();
            for c in resp.changes {
                println!("{c}");
            }
            Ok(())
        }
        Cmd::Get { kind, name, sock } => {
            let resp = admin(&sock.admin_socket)?
                .get(GetRequest {
                    kind,
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", resp.text.trim_end());
            Ok(())
        }
        Cmd::Delete { kind, name, sock } => {
            let resp = admin(&sock.admin_socket)?
                .delete(DeleteRequest {
                    kind: kind.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if !resp.existed {
                bail!("{kind} {name:?} not found");
            }
            println!("{kind}/{name} deleted");
            Ok(())
        }
        Cmd::Token {
            cmd: TokenCmd::Create { ttl, node, sock },
        } => {
            let resp = admin(&sock.admin_socket)?
                .create_join_token(CreateJoinTokenRequest {
                    ttl_secs: duration("--ttl", &ttl)?,
                    node_name: node.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", resp.token);
            Ok(())
        }
        Cmd::Ca {
            cmd: CaCmd::Rotate { step, sock },
        } => {
            let resp = admin(&sock.admin_socket)?
                .rotate_ca(RotateCaRequest { step })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", resp.text);
            Ok(())
        }
        Cmd::Whoami { pid, json, sock } => {
            let resp = agent_admin(&sock.agent_socket)?
                .who_am_i(WhoAmIRequest { pid })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                println!("{}", resp.json);
            } else {
                print_whoami(&resp.json)?;
            }
            Ok(())
        }
        Cmd::Policy {
            cmd:
                PolicyCmd::Check {
                    pid,
                    identity,
                    to,
                    udp,
                    sock,
                },
        } => {
            let resp = agent_admin(&sock.agent_socket)?
                .policy_check(PolicyCheckRequest {
                    pid: pid.unwrap_or(0),
                    identity: identity.unwrap_or_default(),
                    destination: to,
                    protocol: if udp { "udp".into() } else { "tcp".into() },
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", resp.json);
            Ok(())
        }
        Cmd::Events { follow, sock } => {
            let mut stream = agent_admin(&sock.agent_socket)?
                .events(EventsRequest { follow })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(ev) = stream.message().await.map_err(status)? {
                println!("{}", ev.json);
            }
            Ok(())
        }
        Cmd::Detach { cgroup, pin_dir } => {
            tether_kernel::Enforcer::detach_all(&pin_dir, cgroup.as_deref())
                .map_err(|e| anyhow!("detaching: {e}"))?;
            match &cgroup {
                Some(cg) => println!(
                    "removed Tether's programs, links and maps from {} and {}",
                    cg.display(),
                    pin_dir.display()
                ),
                None => println!(
                    "removed Tether's pinned programs, links and maps from {}",
                    pin_dir.display()
                ),
            }
            Ok(())
        }
        Cmd::Fetch {
            socket,
            write,
            watch,
        } => fetch(&socket, write.as_deref(), watch).await,
        Cmd::Svids { sock } => {
            let resp = agent_admin(&sock.agent_socket)?
                .list_svids(ListSvidsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", resp.json);
            Ok(())
        }
        Cmd::Connections { sock } => {
            let resp = agent_admin(&sock.agent_socket)?
                .connections(ConnectionsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", resp.json);
            Ok(())
        }
        Cmd::Credentials { sock } => {
            let resp = agent_admin(&sock.agent_socket)?
                .credentials(CredentialsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", resp.json);
            Ok(())
        }
    }
}

fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow!(
            "cannot reach tether ({}); is `tether up` running?",
            s.message()
        ),
        _ => anyhow!("{}", s.message()),
    }
}

fn check_socket(p: &Path) -> anyhow::Result<()> {
    if !p.exists() {
        bail!(
            "{} does not exist; is tether running? (set the socket with --admin-socket/--agent-socket)",
            p.display()
        );
    }
    Ok(())
}

fn admin(p: &Path) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    check_socket(p)?;
    Ok(AdminClient::new(tether_proto::uds::channel(p)))
}

fn agent_admin(p: &Path) -> anyhow::Result<AgentAdminClient<tonic::transport::Channel>> {
    check_socket(p)?;
    Ok(AgentAdminClient::new(tether_proto::uds::channel(p)))
}

fn print_whoami(json: &str) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let p = &v["process"];
    println!(
        "pid {} ({}) uid {} on node {}",
        v["pid"],
        p["exe_path"].as_str().unwrap_or("?"),
        p["uid"],
        v["node"].as_str().unwrap_or("?")
    );
    println!("selectors:");
    for s in v["selectors"].as_array().into_iter().flatten() {
        println!("  {}", s.as_str().unwrap_or_default());
    }
    let matched = v["matched"].as_array().cloned().unwrap_or_default();
    if matched.is_empty() {
        println!("no identity matches this process:");
    } else {
        for m in &matched {
            println!(
                "MATCHES {} ({})",
                m["identity"].as_str().unwrap_or("?"),
                m["spiffeId"].as_str().unwrap_or("?")
            );
        }
    }
    for m in v["notMatched"].as_array().into_iter().flatten() {
        println!(
            "  not {} ({}):",
            m["identity"].as_str().unwrap_or("?"),
            m["spiffeId"].as_str().unwrap_or("?")
        );
        for (i, set) in m["selectorSets"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let failed: Vec<&str> = set["failed"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .collect();
            println!("    selector set {} fails on: {}", i + 1, failed.join(", "));
        }
    }
    Ok(())
}

async fn fetch(socket: &str, write: Option<&Path>, watch: bool) -> anyhow::Result<()> {
    use tether_proto::workload::X509svidRequest;
    use tether_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let path = socket
        .strip_prefix("unix://")
        .or_else(|| socket.strip_prefix("unix:"))
        .unwrap_or(socket);
    check_socket(Path::new(path))?;
    let mut client = SpiffeWorkloadApiClient::new(tether_proto::uds::channel(Path::new(path)));
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        tether_proto::WORKLOAD_METADATA_KEY,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = client
        .fetch_x509svid(req)
        .await
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    loop {
        let resp = match stream
            .message()
            .await
            .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
        {
            Some(r) => r,
            None if watch => return Ok(()),
            None => bail!("the Workload API closed the stream without an SVID"),
        };
        for svid in &resp.svids {
            let chain = tether_spiffe::x509::split_certificates(&svid.x509_svid)
                .map_err(|e| anyhow!("Workload API sent an unreadable SVID: {e}"))?;
            let expires = chain
                .first()
                .and_then(|c| x509_expiry(c))
                .map(|t| format!("expires at unix time {t}"))
                .unwrap_or_default();
            println!(
                "{}  ({} certificate(s), {expires})",
                svid.spiffe_id,
                chain.len()
            );
            if let Some(dir) = write {
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::create_dir_all(dir)?;
                let certs: String = chain
                    .iter()
                    .map(|c| tether_ca::pem_encode("CERTIFICATE", c))
                    .collect();
                std::fs::write(dir.join("svid.pem"), certs)?;
                let roots: String = tether_spiffe::x509::split_certificates(&svid.bundle)
                    .map_err(|e| anyhow!("Workload API sent an unreadable bundle: {e}"))?
                    .iter()
                    .map(|c| tether_ca::pem_encode("CERTIFICATE", c))
                    .collect();
                std::fs::write(dir.join("bundle.pem"), roots)?;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o600)
                    .open(dir.join("key.pem"))?;
                std::io::Write::write_all(
                    &mut f,
                    tether_ca::pem_encode("PRIVATE KEY", &svid.x509_svid_key).as_bytes(),
                )?;
                println!("wrote svid.pem, key.pem, bundle.pem to {}", dir.display());
            }
        }
        if !watch {
            return Ok(());
        }
    }
}

fn x509_expiry(der: &[u8]) -> Option<i64> {
    tether_spiffe::x509::not_after(der)
}
