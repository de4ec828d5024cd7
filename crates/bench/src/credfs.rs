//! Credential filesystem reads against a plain tmpfs file, measured in the
//! same run: the first read of a fresh process (attestation and, for a
//! static secret, the server round trip), cached reads, and reads per second
//! from 100 processes at once.
//!
//! Readers are this binary re-executed (`--cred-reader PATH N`): each opens,
//! reads to EOF in 4 KiB reads (as `cat` does) and closes PATH N times and
//! prints the nanoseconds of each.
//!
//! The FUSE floor: the same tmpfs file through bindfs (a libfuse
//! filesystem that only passes calls through) mounted with the credential
//! filesystem's kernel settings (no entry, attribute or negative caching,
//! direct I/O), so the cost of FUSE itself under those rules is in the same
//! table as Tether's.

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
    let mut out = String::new();
    if args.get(2).map(String::as_str) == Some("stat") {
        // One round trip to the filesystem and back: stat of a directory.
        for _ in 0..n {
            let t = Instant::now();
            std::fs::metadata(path)?;
            out.push_str(&format!("{}\n", t.elapsed().as_nanos()));
        }
        print!("{out}");
        return Ok(());
    }
    let mut buf = [0u8; 4096];
    let mut total = 0;
    for _ in 0..n {
        total = 0;
        let t = Instant::now();
        let mut f = std::fs::File::open(path)?;
        loop {
            let got = f.read(&mut buf)?;
            if got == 0 {
                break;
            }
            total += got;
        }
        drop(f);
        out.push_str(&format!("{}\n", t.elapsed().as_nanos()));
    }
    if total == 0 {
        anyhow::bail!("{path}: read nothing");
    }
    print!("{out}");
    Ok(())
}

fn reader(path: &Path, n: usize) -> anyhow::Result<std::process::Child> {
    reader_with(path, n, "read")
}

fn reader_with(path: &Path, n: usize, how: &str) -> anyhow::Result<std::process::Child> {
    Ok(Command::new(std::env::current_exe()?)
        .arg(CHILD_ARG)
        .arg(path)
        .arg(n.to_string())
        .arg(how)
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

/// bindfs of `src` at a fresh mount point with the credential filesystem's
/// kernel settings; unmounted when dropped. None when bindfs is missing.
struct Bindfs {
    mnt: tempfile::TempDir,
}

impl Bindfs {
    fn mount(src: &Path) -> anyhow::Result<Option<Bindfs>> {
        let Ok(bin) = which("bindfs") else {
            return Ok(None);
        };
        let mnt = tempfile::Builder::new()
            .prefix("tether-bench-bindfs-")
            .tempdir()?;
        let st = Command::new(bin)
            .args([
                "-o",
                "ro,direct_io,entry_timeout=0,attr_timeout=0,negative_timeout=0",
            ])
            .arg(src)
            .arg(mnt.path())
            .status()?;
        if !st.success() {
            anyhow::bail!("bindfs failed: {st}");
        }
        Ok(Some(Bindfs { mnt }))
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mnt.path())
            .status();
    }
}

fn which(name: &str) -> anyhow::Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{name} not found"))
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
    let bindfs = Bindfs::mount(tmpfs.path())?;
    let floor_file = bindfs.as_ref().map(|b| b.mnt.path().join("secret"));
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
    let (mut floor50, mut floor99, mut floor_ratio, mut over_floor) =
        (vec![], vec![], vec![], vec![]);
    let (mut trip50, mut trip99, mut trip_ratio) = (vec![], vec![], vec![]);
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
        let mut rt = times(reader_with(credentials, READS_PER_PROCESS, "stat")?)?;
        let tp = p(&mut rt, 0.5);
        trip50.push(tp);
        trip99.push(p(&mut rt, 0.99));
        trip_ratio.push(tp.as_secs_f64() / bp.as_secs_f64().max(1e-9));
        if let Some(f) = &floor_file {
            let mut fl = times(reader(f, READS_PER_PROCESS)?)?;
            let fp = p(&mut fl, 0.5);
            floor50.push(fp);
            floor99.push(p(&mut fl, 0.99));
            floor_ratio.push(fp.as_secs_f64() / bp.as_secs_f64().max(1e-9));
            over_floor.push(cp.as_secs_f64() / fp.as_secs_f64().max(1e-9));
        }
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
        "| measurement (open + read 32 bytes to EOF + close), median of {ROUNDS} rounds | p50 | p99 | p50 ratio to tmpfs (range) |\n|---|---|---|---|\n"
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
    out.push_str(&format!(
        "| one FUSE round trip: stat of the credential directory (answered without attestation) | {:?} | {:?} | {:.2} ({}) |\n",
        med(&mut trip50),
        med(&mut trip99),
        medf(&trip_ratio),
        spread(&trip_ratio)
    ));
    if floor_file.is_some() {
        out.push_str(&format!(
            "| FUSE floor: the tmpfs file through bindfs, no kernel caching, direct I/O | {:?} | {:?} | {:.2} ({}) |\n",
            med(&mut floor50),
            med(&mut floor99),
            medf(&floor_ratio),
            spread(&floor_ratio)
        ));
    } else {
        out.push_str("| FUSE floor (bindfs) | not measured: bindfs is not installed | | |\n");
    }
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
    if !over_floor.is_empty() {
        out.push_str(&format!(
            "\nCached credential read over the FUSE floor, p50: {:.2} ({}).\n",
            medf(&over_floor),
            spread(&over_floor)
        ));
    }
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
