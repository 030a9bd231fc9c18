//! The `portcullis` command: parses the command line, sets up logging, loads
//! the config and runs the library.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use portcullis::config::{Config, HostPattern, TlsSource};
use portcullis::Server;

// mimalloc instead of glibc malloc: the request path allocates and frees
// many small, short-lived objects (hyper's per-request state, header maps,
// task cells). Measured in the performance pass of benches/RESULTS.md.
// Built with `no_thp`: transparent huge pages would double the idle RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A TLS-terminating reverse proxy that keeps its certificates alive"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum RevokeReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration and its certificates; exit 0 if good, 1 if not.
    Validate {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List every certificate served, with expiry; exit 1 if any expires within --within.
    Certs {
        /// Read the files a config names (no running proxy needed).
        #[arg(long, short, conflicts_with = "admin")]
        config: Option<PathBuf>,
        /// Ask a running proxy's admin API.
        #[arg(long)]
        admin: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Exit 1 when a certificate expires within this (e.g. 30d).
        #[arg(long, value_parser = parse_dur)]
        within: Option<Duration>,
    },
    /// Connect to HOST:PORT and show the served chain, dates and whether it verifies.
    Inspect {
        /// host:port
        target: String,
        /// SNI name to send (default: the host).
        #[arg(long)]
        servername: Option<String>,
        /// Trust this CA bundle instead of the system roots.
        #[arg(long)]
        cafile: Option<PathBuf>,
        /// Exit 1 when the leaf expires within this (e.g. 7d).
        #[arg(long, value_parser = parse_dur)]
        within: Option<Duration>,
        /// Connect and handshake timeout.
        #[arg(long, value_parser = parse_dur, default_value = "10s")]
        timeout: Duration,
    },
    /// Ask a running proxy to reload its configuration and certificates.
    Reload {
        /// Admin API of the running proxy.
        #[arg(long, default_value = "http://127.0.0.1:9901")]
        admin: String,
        /// Print the admin API's JSON answer instead of one line.
        #[arg(long)]
        json: bool,
    },
    /// Renew a certificate now (certificates portcullis issues itself).
    Renew {
        /// The certificate's (site's) name, as `portcullis certs` lists it.
        name: String,
        /// Renew even if it is not due, with a fresh key.
        #[arg(long)]
        force: bool,
        /// Admin API of the running proxy.
        #[arg(long, default_value = "http://127.0.0.1:9901")]
        admin: String,
        /// Print the admin API's JSON answer instead of one line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an ACME certificate: order a replacement (new key), put it in
    /// service, then revoke the old one at the CA.
    Revoke {
        /// The certificate's (site's) name, as `portcullis certs` lists it.
        name: String,
        /// Why (RFC 5280 reason).
        #[arg(long, value_enum)]
        reason: RevokeReason,
        /// Admin API of the running proxy.
        #[arg(long, default_value = "http://127.0.0.1:9901")]
        admin: String,
    },
    /// Proxy one address to one upstream, no config file needed.
    ReverseProxy {
        /// Address to serve HTTPS on, e.g. `localhost:8443` or `0.0.0.0:443`.
        #[arg(long)]
        from: String,
        /// Upstream URL, e.g. `http://127.0.0.1:3000`.
        #[arg(long)]
        to: String,
        /// Certificate chain (PEM); without it the internal CA issues one.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Host names to serve (default: the host of --from, or localhost).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Where the internal CA lives.
        #[arg(long, default_value = "state")]
        state_dir: PathBuf,
        /// Admin listener address, or `off`.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => {
            // Access-log lines on stderr follow, unless the config names a format.
            portcullis::accesslog::set_default_format(portcullis::config::AccessLogFormat::Json);
            builder.json().flatten_event(true).init()
        }
    }
}

/// POSTs to a running proxy's admin API, prints the answer, exits 0 on 200.
fn admin_post(admin: &str, path: &str) -> Result<ExitCode> {
    let (status, body) = block_on(portcullis::ops::admin_request(admin, "POST", path))??;
    print!("{body}");
    Ok(exit_for(status))
}

/// Success only for `200 OK` from the admin API.
fn exit_for(status: u16) -> ExitCode {
    if status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    portcullis::config::parse_duration(s)
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f))
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Certs {
            config,
            admin,
            json,
            within,
        } => {
            let reports = match config {
                Some(path) => portcullis::ops::inventory_from_config(&path)?,
                None => {
                    let admin = admin.unwrap_or_else(|| "http://127.0.0.1:9901".into());
                    block_on(portcullis::ops::inventory_from_admin(&admin))??
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", portcullis::ops::inventory_table(&reports));
            }
            let now = std::time::SystemTime::now();
            let soon: Vec<_> = within
                .map(|w| {
                    reports
                        .iter()
                        .filter(|r| r.expires_within(w, now))
                        .collect()
                })
                .unwrap_or_default();
            if !soon.is_empty() {
                for r in &soon {
                    eprintln!(
                        "{}: expires {} (within {})",
                        r.name,
                        r.not_after.as_deref().unwrap_or("- (no certificate)"),
                        humantime(within.unwrap_or_default())
                    );
                }
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            target,
            servername,
            cafile,
            within,
            timeout,
        } => {
            let ins = match block_on(portcullis::ops::inspect(
                &target,
                servername.as_deref(),
                cafile.as_deref(),
                timeout,
            ))? {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            print!("{}", ins.render(&target));
            let mut ok = ins.verify_error.is_none();
            if let (Some(w), Some(na)) = (within, ins.leaf_not_after()) {
                if na <= std::time::SystemTime::now() + w {
                    eprintln!("the leaf certificate expires within {}", humantime(w));
                    ok = false;
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Reload { admin, json } => {
            let (status, body) =
                block_on(portcullis::ops::admin_request(&admin, "POST", "/reload"))??;
            if json {
                print!("{body}");
            } else {
                println!("{}", portcullis::ops::reload_line(&body));
            }
            Ok(exit_for(status))
        }
        Command::Renew {
            name,
            force,
            admin,
            json,
        } => {
            let path = format!("/certs/{name}/renew{}", if force { "?force=1" } else { "" });
            let (status, body) = block_on(portcullis::ops::admin_request(&admin, "POST", &path))??;
            if json {
                print!("{body}");
            } else {
                // The answer names the serial; the inventory adds its end of
                // validity (left out if it cannot be read).
                let inventory = if status == 200 {
                    block_on(portcullis::ops::inventory_from_admin(&admin))?.ok()
                } else {
                    None
                };
                println!(
                    "{}",
                    portcullis::ops::renew_line(&name, &body, inventory.as_deref())
                );
            }
            Ok(exit_for(status))
        }
        Command::Revoke {
            name,
            reason,
            admin,
        } => {
            let reason = reason
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            let path = format!("/certs/{name}/revoke?reason={reason}");
            admin_post(&admin, &path)
        }
        Command::Validate { config } => Ok(validate(&config)),
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            serve(config)
        }
        Command::ReverseProxy {
            from,
            to,
            cert,
            key,
            hosts,
            state_dir,
            admin,
        } => {
            let (addr, from_host) = parse_from(&from)?;
            let to = parse_to(&to)?;
            let hosts = if hosts.is_empty() {
                vec![from_host.unwrap_or_else(|| "localhost".into())]
            } else {
                hosts
            };
            let tls = match (cert, key) {
                (Some(cert), Some(key)) => TlsSource::Files {
                    origin: portcullis::config::Origin {
                        file: "<command line>".into(),
                        line: 0,
                        field: "--cert/--key".into(),
                    },
                    cert,
                    key,
                },
                _ => TlsSource::Internal,
            };
            let admin = if admin == "off" {
                None
            } else {
                Some(
                    admin
                        .parse::<SocketAddr>()
                        .with_context(|| format!("--admin {admin:?} is not IP:PORT or \"off\""))?,
                )
            };
            let config = Config::reverse_proxy(addr, hosts, to, tls, state_dir, admin);
            serve(config)
        }
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("configuration {} is invalid", path.display());
            return ExitCode::FAILURE;
        }
    };
    // Certificates are checked exactly as `run` would load them.
    let mut failed = false;
    for site in &config.sites {
        if let TlsSource::Files { cert, key, origin } = &site.tls {
            if let Err(e) = portcullis::certstore::load::load_files(
                cert,
                key,
                &site.hosts,
                portcullis::certstore::Checks {
                    allow_expired: true,
                },
            ) {
                eprintln!("{origin}: {e}");
                failed = true;
            }
        }
    }
    if let Err(e) = portcullis::acme::preflight(&config) {
        eprintln!("{e}");
        failed = true;
    }
    if failed {
        eprintln!("configuration {} is invalid", path.display());
        return ExitCode::FAILURE;
    }
    println!("configuration {} is valid", path.display());
    ExitCode::SUCCESS
}

/// `PORTCULLIS_WORKERS=N` sets the number of runtime worker threads
/// (default: one per CPU the process may run on).
const WORKERS_ENV: &str = "PORTCULLIS_WORKERS";

fn serve(config: Config) -> Result<ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(v) = std::env::var_os(WORKERS_ENV) {
        let v = v.to_string_lossy();
        let n = v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| {
                format!("{WORKERS_ENV}={v:?} is not valid: write a number of threads, at least 1")
            })?;
        builder.worker_threads(n);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        portcullis::shutdown::on_signals(shutdown.clone());
        let first_internal = config.sites.iter().find(|s| s.tls == TlsSource::Internal).map(|s| s.hosts.clone());
        let server = Server::bind(config, shutdown).await?;
        if let (Some(ca), Some(hosts)) = (server.internal_ca_path(), first_internal) {
            let ca = std::fs::canonicalize(&ca).unwrap_or(ca);
            let host = hosts
                .iter()
                .map(|h| match h {
                    HostPattern::Exact(h) => h.clone(),
                    HostPattern::Wildcard(s) => format!("www.{s}"),
                })
                .next()
                .unwrap_or_else(|| "localhost".into());
            tracing::info!(ca = %ca.display(), "internal CA certificate (trust this file to verify internal certificates)");
            if let Some(addr) = server.https_addrs().first() {
                let port = if addr.port() == 443 { String::new() } else { format!(":{}", addr.port()) };
                eprintln!("try: curl --cacert {} https://{host}{port}/", ca.display());
            }
        }
        server.run().await?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s % 86_400 == 0 && s > 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 && s > 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// `localhost:8443`, `:8443`, `0.0.0.0:443`, `[::1]:443` -> address and host name.
fn parse_from(from: &str) -> Result<(SocketAddr, Option<String>)> {
    if let Ok(a) = from.parse::<SocketAddr>() {
        return Ok((a, None));
    }
    if let Some(port) = from.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .with_context(|| format!("--from {from:?}: bad port"))?;
        return Ok((SocketAddr::from(([0, 0, 0, 0], port)), None));
    }
    let Some((host, _)) = from.rsplit_once(':') else {
        bail!("--from {from:?} needs a port, e.g. localhost:8443");
    };
    let addr = from
        .to_socket_addrs()
        .with_context(|| format!("--from {from:?}: cannot resolve"))?
        .next()
        .with_context(|| format!("--from {from:?}: no address"))?;
    Ok((addr, Some(host.to_string())))
}

fn parse_to(to: &str) -> Result<http::Uri> {
    let with_scheme = if to.contains("://") {
        to.to_string()
    } else {
        format!("http://{to}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .with_context(|| format!("--to {to:?} is not a URL; write http://host:port"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        bail!("--to {to:?}: only http://host:port upstreams are supported");
    }
    Ok(uri)
}
