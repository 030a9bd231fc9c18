//! The `portcullis` CLI run as a child process, and the on-call fixture
//! (three certificates: valid, expiring soon, expired) its tests share.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::common::pki::{at_unix, unix_now, Alg, Leaf, Pki};
use crate::common::proxy::{respond_site, sites_head, start_with_certs, wait_ready, Proxy};

/// A proxy serving three file certificates from one PKI: `normal`
/// (`normal.test`, 90 days, ECDSA, the default site), `soon` (`soon.test`,
/// 5 days, RSA) and `expired` (`expired.test`, expired 2 days ago; loaded
/// at start with a warning). Dates are whole seconds; `root.pem` is written
/// next to the config.
pub struct OnCall {
    pub pki: Pki,
    pub proxy: Proxy,
    pub certs: Arc<portcullis::certstore::CertStore>,
    pub normal: Leaf,
    pub soon: Leaf,
    pub expired: Leaf,
    /// (not_before, not_after) of each, Unix seconds, same order.
    pub dates: [(i64, i64); 3],
    pub root_pem: PathBuf,
}

impl OnCall {
    pub async fn start() -> OnCall {
        const DAY: i64 = 86_400;
        let pki = Pki::new();
        let now = unix_now();
        let dates = [
            (now - DAY, now + 90 * DAY),
            (now - 85 * DAY, now + 5 * DAY),
            (now - 30 * DAY, now - 2 * DAY),
        ];
        let dir = tempfile::tempdir().unwrap();
        let normal = pki.leaf_with_dates(
            &["normal.test"],
            Alg::Ecdsa,
            at_unix(dates[0].0),
            at_unix(dates[0].1),
        );
        let soon = pki.leaf_with_dates(
            &["soon.test"],
            Alg::Rsa,
            at_unix(dates[1].0),
            at_unix(dates[1].1),
        );
        let expired = pki.leaf_with_dates(
            &["expired.test"],
            Alg::Ecdsa,
            at_unix(dates[2].0),
            at_unix(dates[2].1),
        );
        normal.write(dir.path(), "normal-");
        soon.write(dir.path(), "soon-");
        expired.write(dir.path(), "expired-");
        let root_pem = dir.path().join("root.pem");
        std::fs::write(&root_pem, &pki.root_pem).unwrap();
        let site = |name: &str, default: bool| {
            respond_site(
                Some(name),
                &format!("\"{name}.test\""),
                &format!("{name}-"),
                default,
                &format!("{name}\n"),
            )
        };
        let head = sites_head(true, "[certificates]\npoll_interval = \"1h\"");
        let toml = format!(
            "{head}{}{}{}",
            site("normal", true),
            site("soon", false),
            site("expired", false)
        );
        // The same config with only the 90-day certificate, for `--config`.
        std::fs::write(
            dir.path().join("only-normal.toml"),
            format!("{head}{}", site("normal", true)),
        )
        .unwrap();
        let (proxy, certs) = start_with_certs(dir, &toml).await;
        wait_ready(&proxy).await;
        OnCall {
            pki,
            proxy,
            certs,
            normal,
            soon,
            expired,
            dates,
            root_pem,
        }
    }

    /// `http://ADMIN`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.proxy.admin.unwrap())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.proxy.dir.join(name)
    }
}

/// What a run of the `portcullis` binary printed and how it exited.
#[derive(Debug)]
pub struct Cli {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real binary with `args` (asynchronously, so an in-process proxy
/// keeps serving), at most 60 s.
pub async fn cli<I, S>(args: I, env: &[(&str, Option<&str>)]) -> Cli
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("portcullis CLI finished within 60 s")
        .expect("portcullis binary runs");
    Cli {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// RFC 3339 of Unix seconds, as the CLI prints dates.
pub fn rfc3339_of(secs: i64) -> String {
    at_unix(secs)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}
