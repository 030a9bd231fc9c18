//! hsload: TLS handshake load for the side-by-side comparison
//! (`benches/compare/run.sh`).
//!
//! Each of `--concurrency` tasks loops until `--duration` is over: TCP
//! connect, TLS handshake, one `GET` with `Connection: close`, read the whole
//! response, close. Without `--resume` session resumption is disabled in the
//! client, so every handshake is a full one (unlike `wrk -H 'Connection:
//! close'`, which quietly resumes). With `--resume` each task keeps its own
//! ticket store, filled by one untimed connection before the clock starts,
//! so every timed connection offers the ticket its predecessor received;
//! the summary counts how many really resumed.
//!
//! The client offers X25519 only (what the OpenSSL-based tools offer; no
//! hybrid post-quantum share that only some servers would pick) and, unless
//! `--cafile` is given, does not verify the server's certificate: the server
//! does the same work either way, and one client core must out-run one
//! server core.
//!
//! The last line of output is `key=value` pairs for scripts:
//! `hs_per_s= ok= errors= resumed= p50_ms= p99_ms= elapsed_s=`.
//!
//! ```text
//! cargo run --release --example hsload -- --addr 127.0.0.1:8443 --sni localhost -c 50 -d 10s
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
#[command(
    name = "hsload",
    about = "TLS handshakes + one GET per connection, for a bounded time"
)]
struct Args {
    /// Address to connect to.
    #[arg(long)]
    addr: SocketAddr,
    /// SNI name to send (also the Host header).
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Concurrent connections.
    #[arg(long, short, default_value_t = 50)]
    concurrency: usize,
    /// How long to run, e.g. `10s`, `2s`, `500ms`.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Resume sessions (TLS 1.3 tickets) instead of a full handshake each time.
    #[arg(long)]
    resume: bool,
    /// Verify the server's certificate against this CA file.
    #[arg(long)]
    cafile: Option<PathBuf>,
    /// One request; print the status and body; exit 0 on a 200.
    #[arg(long)]
    probe: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration; write e.g. 10s or 500ms");
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if v.is_nan() || v <= 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Accepts any certificate: the load client measures the server, not PKI.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(args: &Args, resumption: Resumption) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let mut cfg = match &args.cafile {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
            {
                roots
                    .add(cert.map_err(|e| format!("{}: {e}", path.display()))?)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = resumption;
    Ok(Arc::new(cfg))
}

/// What one connection did.
struct Done {
    status: u16,
    body: Vec<u8>,
    resumed: bool,
}

async fn one(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
    request: &[u8],
) -> Result<Done, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = connector
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    tls.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            // EOF: fine only if the response has no length (read to close).
            return match parse(&buf, true)? {
                Some(done) => Ok(Done { resumed, ..done }),
                None => Err(format!(
                    "connection closed after {} bytes of response",
                    buf.len()
                )),
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(done) = parse(&buf, false)? {
            // Polite close (close_notify); the socket is dropped right after.
            let _ = tls.shutdown().await;
            return Ok(Done { resumed, ..done });
        }
    }
}

/// A complete response in `buf`, if there is one yet.
fn parse(buf: &[u8], eof: bool) -> Result<Option<Done>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf).map_err(|e| format!("bad response: {e}"))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let body = &buf[head_len..];
    let complete = if let Some(cl) = header("content-length") {
        let cl: usize = cl
            .trim()
            .parse()
            .map_err(|_| format!("bad content-length {cl:?}"))?;
        (body.len() >= cl).then(|| body[..cl].to_vec())
    } else if header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        body.ends_with(b"0\r\n\r\n").then(|| body.to_vec())
    } else {
        eof.then(|| body.to_vec())
    };
    Ok(complete.map(|body| Done {
        status,
        body,
        resumed: false,
    }))
}

/// Totals of one task.
#[derive(Default)]
struct Tally {
    ok: u64,
    resumed: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hsload: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<std::process::ExitCode, String> {
    let name =
        ServerName::try_from(args.sni.clone()).map_err(|e| format!("--sni {:?}: {e}", args.sni))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: hsload\r\nConnection: close\r\n\r\n",
        args.path, args.sni
    )
    .into_bytes();

    if args.probe {
        let connector = TlsConnector::from(client_config(&args, Resumption::disabled())?);
        let done = tokio::time::timeout(
            Duration::from_secs(5),
            one(&connector, args.addr, &name, &request),
        )
        .await
        .map_err(|_| "timed out".to_string())??;
        println!(
            "{} {}",
            done.status,
            String::from_utf8_lossy(&done.body).trim_end()
        );
        return Ok(if done.status == 200 {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        });
    }

    let shared = client_config(&args, Resumption::disabled())?;
    let mut connectors = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        if args.resume {
            // A ticket store per task, so each connection resumes with the
            // ticket its predecessor on this task was given. One untimed
            // full handshake per task first fills the store.
            let connector =
                TlsConnector::from(client_config(&args, Resumption::in_memory_sessions(8))?);
            tokio::time::timeout(
                Duration::from_secs(10),
                one(&connector, args.addr, &name, &request),
            )
            .await
            .map_err(|_| "priming connection timed out".to_string())?
            .map_err(|e| format!("priming connection: {e}"))?;
            connectors.push(connector);
        } else {
            connectors.push(TlsConnector::from(shared.clone()));
        }
    }
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::with_capacity(args.concurrency);
    for connector in connectors {
        let (name, request, addr) = (name.clone(), request.clone(), args.addr);
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    one(&connector, addr, &name, &request),
                )
                .await
                .unwrap_or_else(|_| Err("timed out after 10s".into()));
                match r {
                    Ok(done) if done.status == 200 => {
                        t.ok += 1;
                        t.resumed += u64::from(done.resumed);
                        t.latencies_us
                            .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Ok(done) => {
                        t.errors += 1;
                        t.first_error
                            .get_or_insert_with(|| format!("status {}", done.status));
                    }
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert(e);
                        // Do not spin on a refused or exhausted connect.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            t
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.map_err(|e| format!("task failed: {e}"))?;
        all.ok += t.ok;
        all.resumed += t.resumed;
        all.errors += t.errors;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
        all.latencies_us.extend(t.latencies_us);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let rate = all.ok as f64 / elapsed;
    let (p50, p99) = (
        percentile(&all.latencies_us, 0.50),
        percentile(&all.latencies_us, 0.99),
    );
    let kind = if args.resume {
        "resumed-capable"
    } else {
        "full"
    };
    println!(
        "{} connections ({kind} handshakes) in {elapsed:.2}s: {rate:.1} handshakes/s, {} resumed, {} errors, latency p50 {p50:.2} ms p99 {p99:.2} ms",
        all.ok, all.resumed, all.errors
    );
    if let Some(e) = &all.first_error {
        println!("first error: {e}");
    }
    println!(
        "hs_per_s={rate:.1} ok={} errors={} resumed={} p50_ms={p50:.3} p99_ms={p99:.3} elapsed_s={elapsed:.3}",
        all.ok, all.errors, all.resumed
    );
    Ok(std::process::ExitCode::SUCCESS)
}
