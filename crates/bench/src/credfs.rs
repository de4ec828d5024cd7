//! Credential filesystem reads against a plain tmpfs file, measured in the
//! same run: the first read of a fresh process (attestation and, for a
//! static secret, the server round trip), cached reads, and reads per second
//! from 100 processes at once.
//!
//! Readers are this binary re-executed (`--cred-reader PATH N`): each opens,
//! reads and closes PATH N times and prints the nanoseconds of each.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_proto::tether::ApplyRequest;
use tether_proto::tether::admin_client::AdminClient;

pub const CHILD_ARG: &str = "--cred-reader";
const ROUNDS: usize = 5;
const READS_PER_PROCESS: usize = 2000;
const FRESH_PROCESSES: usize = 100;
const PARALLEL: usize = 100;
const PARALLEL_READS: usize = 1000;

/// The reader child: N timed open+read+close of one file.
pub fn child_main(args: &[String]) -> anyhow::Result<()> {
    let path = args.first().ok_or_else(|| anyhow::anyhow!("path"))?;
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut buf = Vec::with_capacity(4096);
    let mut out = String::new();
    for _ in 0..n {
        buf.clear();
        let t = Instant::now();
        std::fs::File::open(path)?.read_to_end(&mut buf)?;
        out.push_str(&format!("{}\n", t.elapsed().as_nanos()));
    }
    if buf.is_empty() {
        anyhow::bail!("{path}: read nothing");
    }
    print!("{out}");
    Ok(())
}

fn reader(path: &Path, n: usize) -> anyhow::Result<std::process::Child> {
    Ok(Command::new(std::env::current_exe()?)
        .arg(CHILD_ARG)
        .arg(path)
        .arg(n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn times(child: std::process::Child) -> anyhow::Result<Vec<Duration>> {
    let o = child.wait_with_output()?;
    if !o.status.success() {
        anyhow::bail!("reader failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.parse().ok())
        .map(Duration::from_nanos)
        .collect())
}

/// Reads per second of `PARALLEL` processes reading at once.
fn parallel_rate(path: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let children: Vec<_> = (0..PARALLEL)
        .map(|_| reader(path, PARALLEL_READS))
        .collect::<anyhow::Result<_>>()?;
    let mut reads = 0;
    for c in children {
        reads += times(c)?.len();
    }
    Ok(reads as f64 / t.elapsed().as_secs_f64())
}

fn p(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or_default()
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{lo:.2}–{hi:.2}")
}

/// Registers this binary for a static secret as a file and measures.
pub async fn run(
    admin: &AdminClient<tonic::transport::Channel>,
    credentials: &Path,
) -> anyhow::Result<String> {
    let me = std::env::current_exe()?;
    let manifest = format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: bench-reader}}\nspec:\n  spiffeId: spiffe://example.org/bench-reader\n  selectors: [[\"process:path:{}\"]]\n---\napiVersion: tether.dev/v1alpha1\nkind: CredentialSource\nmetadata: {{name: bench-secret}}\nspec:\n  static: {{value: \"0123456789abcdef0123456789abcdef\"}}\n---\napiVersion: tether.dev/v1alpha1\nkind: CredentialBinding\nmetadata: {{name: bench-secret}}\nspec: {{identity: bench-reader, source: bench-secret, file: {{name: secret}}}}\n",
        me.display()
    );
    admin
        .clone()
        .apply(ApplyRequest {
            source: "bench-credfs".into(),
            manifest: manifest.into_bytes(),
        })
        .await?;
    let cred = credentials.join("secret");
    // The baseline: the same 32 bytes in a tmpfs file.
    let tmpfs = tempfile::Builder::new().tempdir_in("/dev/shm")?;
    let plain = tmpfs.path().join("secret");
    std::fs::write(&plain, "0123456789abcdef0123456789abcdef")?;
    // Warm up: the registry reached the agent, the binary is hashed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if times(reader(&cred, 1)?).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the bench reader never read its credential file");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (mut base50, mut base99, mut cached50, mut cached99) = (vec![], vec![], vec![], vec![]);
    let (mut first50, mut first99, mut ratio, mut prate, mut brate) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let mut b = times(reader(&plain, READS_PER_PROCESS)?)?;
        let mut c = times(reader(&cred, READS_PER_PROCESS)?)?;
        // Cached: every read after the process's first.
        let mut cached: Vec<Duration> = c.split_off(1);
        let (bp, cp) = (p(&mut b, 0.5), p(&mut cached, 0.5));
        base50.push(bp);
        base99.push(p(&mut b, 0.99));
        cached50.push(cp);
        cached99.push(p(&mut cached, 0.99));
        ratio.push(cp.as_secs_f64() / bp.as_secs_f64().max(1e-9));
        // First read of fresh processes (attest, fetch from the server).
        let mut first = Vec::new();
        for _ in 0..FRESH_PROCESSES / ROUNDS {
            first.extend(times(reader(&cred, 1)?)?);
        }
        first50.push(p(&mut first, 0.5));
        first99.push(p(&mut first, 0.99));
        brate.push(parallel_rate(&plain)?);
        prate.push(parallel_rate(&cred)?);
    }
    let med = |v: &mut Vec<Duration>| p(v, 0.5);
    let medf = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s[s.len() / 2]
    };
    let mut out = String::new();
    out.push_str("## Credential filesystem reads\n\n");
    out.push_str(&format!(
        "| measurement (open + read 32 bytes + close), median of {ROUNDS} rounds | p50 | p99 | p50 ratio to tmpfs (range) |\n|---|---|---|---|\n"
    ));
    out.push_str(&format!(
        "| baseline: tmpfs file | {:?} | {:?} | 1.00 |\n",
        med(&mut base50),
        med(&mut base99)
    ));
    out.push_str(&format!(
        "| credential file, cached (same process, reads 2..{READS_PER_PROCESS}) | {:?} | {:?} | {:.2} ({}) |\n",
        med(&mut cached50),
        med(&mut cached99),
        medf(&ratio),
        spread(&ratio)
    ));
    let first_ratio: Vec<f64> = first50
        .iter()
        .zip(&base50)
        .map(|(f, b)| f.as_secs_f64() / b.as_secs_f64().max(1e-9))
        .collect();
    out.push_str(&format!(
        "| credential file, first read of a fresh process ({FRESH_PROCESSES} processes) | {:?} | {:?} | {:.0} ({}) |\n",
        med(&mut first50),
        med(&mut first99),
        medf(&first_ratio),
        spread(&first_ratio)
    ));
    let rr: Vec<f64> = prate.iter().zip(&brate).map(|(c, b)| c / b).collect();
    out.push_str(&format!(
        "\n| {PARALLEL} processes reading at once ({PARALLEL_READS} reads each) | reads/s | ratio (range) |\n|---|---|---|\n| baseline: tmpfs file | {:.0} | 1.00 |\n| credential file | {:.0} | {:.2} ({}) |\n\n",
        medf(&brate),
        medf(&prate),
        medf(&rr),
        spread(&rr)
    ));
    Ok(out)
}
