//! Replaces a certificate and key pair in place, over and over, the way a
//! renewal tool does (each file written to a temp file, then renamed; the
//! key first, then the certificate), for the swap scenario of
//! `benches/compare/run.sh`.
//!
//! One process with no fork per swap: the shell loop it replaces spent
//! more CPU on `cp` and `mv` processes than the proxy spent reloading, and
//! took it from the load generator or the proxy.
//!
//! ```text
//! swapcerts --dir D --name ecdsa --from A --from B --count 100 --over 9s
//! ```
//! alternates the pairs `A.crt`/`A.key` and `B.crt`/`B.key` into
//! `D/ecdsa.crt` and `D/ecdsa.key`, `count` times spread evenly over `over`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Swap a certificate and key pair in place, repeatedly")]
struct Args {
    /// Directory holding the served pair.
    #[arg(long)]
    dir: PathBuf,
    /// File stem of the served pair (`NAME.crt`, `NAME.key`).
    #[arg(long)]
    name: String,
    /// Stem of a source pair (`STEM.crt`, `STEM.key`); give two or more.
    #[arg(long = "from", required = true)]
    from: Vec<PathBuf>,
    /// Number of swaps.
    #[arg(long, default_value_t = 100)]
    count: u32,
    /// Time the swaps are spread over, e.g. `9s`, `1500ms`.
    #[arg(long, default_value = "9s")]
    over: String,
}

fn parse_duration(s: &str) -> Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    Ok(Duration::from_secs_f64(match unit {
        "ms" => n / 1000.0,
        "s" => n,
        _ => bail!("bad duration {s:?}: use s or ms"),
    }))
}

/// Writes `data` to `dst` through a temp file in the same directory.
fn replace(dst: &Path, data: &[u8]) -> Result<()> {
    let tmp = dst.with_extension("swap-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dst).with_context(|| format!("renaming into {}", dst.display()))
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.from.len() < 2 {
        bail!("give at least two --from pairs to alternate");
    }
    let pairs = a
        .from
        .iter()
        .map(|stem| {
            let read = |ext: &str| {
                let p = stem.with_extension(ext);
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
            };
            Ok((read("crt")?, read("key")?))
        })
        .collect::<Result<Vec<_>>>()?;
    let crt = a.dir.join(format!("{}.crt", a.name));
    let key = a.dir.join(format!("{}.key", a.name));
    let step = parse_duration(&a.over)? / a.count.max(1);
    let start = Instant::now();
    for i in 0..a.count {
        let (c, k) = &pairs[(i as usize + 1) % pairs.len()];
        replace(&key, k)?;
        replace(&crt, c)?;
        let next = start + step * (i + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(())
}
