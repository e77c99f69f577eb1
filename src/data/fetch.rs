//! Downloads a dataset archive with a progress bar, resuming a partial file and verifying its checksum.

use anyhow::{bail, Context, Result};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An archive to fetch.
#[derive(Debug, Clone)]
pub struct Remote {
    pub url: String,
    /// What the file must hash to.
    pub checksum: Checksum,
    /// Expected size in bytes, when known (shown before the server answers).
    pub len: Option<u64>,
}

/// The digest a downloaded file must have. SHA-256 where we know it; CIFAR-100's archive is published
/// with an MD5 only, which still catches a truncated or corrupt download.
#[derive(Debug, Clone, PartialEq)]
pub enum Checksum {
    Sha256(String),
    Md5(String),
}

impl Checksum {
    /// The algorithm's name, as messages print it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sha256(_) => "SHA-256",
            Self::Md5(_) => "MD5",
        }
    }

    /// The expected digest, hex.
    pub fn expected(&self) -> &str {
        match self {
            Self::Sha256(h) | Self::Md5(h) => h,
        }
    }

    /// The same algorithm's digest of a file, hex.
    pub fn of_file(&self, path: &Path) -> Result<String> {
        match self {
            Self::Sha256(_) => hash_file::<Sha256>(path),
            Self::Md5(_) => hash_file::<Md5>(path),
        }
    }

    /// Whether the file has the expected digest.
    pub fn matches(&self, path: &Path) -> Result<bool> {
        Ok(self.of_file(path)? == self.expected())
    }
}

/// The official CIFAR-10 binary archive.
pub fn cifar10() -> Remote {
    Remote {
        url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz".into(),
        checksum: Checksum::Sha256("c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd".into()),
        len: Some(170_052_171),
    }
}

/// The official CIFAR-100 binary archive (fine and coarse labels).
pub fn cifar100() -> Remote {
    Remote {
        url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz".into(),
        checksum: Checksum::Md5("03b5dce01913d631647c71ecec9e9cb8".into()),
        len: Some(168_513_733),
    }
}

/// CIFAR-10N's human labels (Wei et al. 2022, CC BY-NC 4.0), from the authors' repository.
pub fn cifar10n() -> Remote {
    Remote {
        url: "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/CIFAR-10_human.pt".into(),
        checksum: Checksum::Sha256("873e69c39cb9b5e97fb6bae2d60bb59b38a5cbc31d2b868f7903dcb2b9dd2310".into()),
        len: Some(2_401_007),
    }
}

/// CIFAR-100N's human labels, from the same repository.
pub fn cifar100n() -> Remote {
    Remote {
        url: "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/CIFAR-100_human.pt".into(),
        checksum: Checksum::Sha256("bd2d80409754d420292d622e15e25248ba21e37d27429efac49c8da723f44394".into()),
        len: Some(1_000_959),
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    hash_file::<Sha256>(path)
}

fn hash_file<H: Digest>(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = H::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// How long a download waits, and how often it tries again.
#[derive(Debug, Clone)]
pub struct Patience {
    /// Connecting, and then waiting for the server's answer.
    pub connect: Duration,
    pub answer: Duration,
    /// No byte for this long while receiving the body counts as a stall.
    pub stall: Duration,
    /// Attempts in all (each resumes the part file), and the first wait between two; it doubles.
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            connect: Duration::from_secs(15),
            answer: Duration::from_secs(30),
            stall: Duration::from_secs(30),
            attempts: 4,
            backoff: Duration::from_secs(2),
        }
    }
}

/// Downloads `remote` to `dest` with the default [`Patience`]. A complete, verified `dest` is kept as
/// it is; a `dest.part` left by an interrupted download is resumed (HTTP Range) or restarted when the
/// server cannot resume. A file whose checksum does not match is removed and reported.
pub fn download(remote: &Remote, dest: &Path, show_progress: bool) -> Result<PathBuf> {
    download_with(remote, dest, show_progress, &Patience::default())
}

/// What one attempt ended with.
enum Failure {
    /// Worth another attempt: a timeout, a stall, a dropped connection, a server error.
    Retry(String),
    /// Another attempt would fail the same way: a malformed URL, a 404.
    Fatal(anyhow::Error),
}

/// [`download`] with explicit timeouts and retries.
pub fn download_with(remote: &Remote, dest: &Path, show_progress: bool, patience: &Patience) -> Result<PathBuf> {
    if dest.is_file() {
        if remote.checksum.matches(dest)? {
            return Ok(dest.to_path_buf());
        }
        bail!(
            "{} exists but its {} does not match the official file: it is corrupt or a different file; delete it and run the command again",
            dest.display(),
            remote.checksum.name()
        );
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let part = dest.with_extension("gz.part");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(patience.connect))
        .timeout_recv_response(Some(patience.answer))
        .build()
        .into();
    let mut wait = patience.backoff;
    let mut last = String::new();
    for attempt in 1..=patience.attempts.max(1) {
        match attempt_download(&agent, remote, &part, show_progress, patience) {
            Ok(()) => return finish(remote, &part, dest),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why)) => {
                last = why;
                if attempt < patience.attempts {
                    eprintln!(
                        "{last}; trying again in {:.0} s (attempt {} of {})",
                        wait.as_secs_f64(),
                        attempt + 1,
                        patience.attempts
                    );
                    std::thread::sleep(wait);
                    wait *= 2;
                }
            }
        }
    }
    bail!(
        "{last}, {} attempts in all; check the network (or --url) and run the command again: the partial file is resumed",
        patience.attempts
    )
}

fn attempt_download(
    agent: &ureq::Agent,
    remote: &Remote,
    part: &Path,
    show_progress: bool,
    patience: &Patience,
) -> std::result::Result<(), Failure> {
    let fatal = |e: anyhow::Error| Failure::Fatal(e);
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(&remote.url);
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let url = &remote.url;
    let resp = match req.call() {
        Ok(r) => r,
        // The part file is already whole (or longer than the file): verify it.
        Err(ureq::Error::StatusCode(416)) => return Ok(()),
        Err(ureq::Error::StatusCode(code)) if (400..500).contains(&code) => {
            return Err(fatal(anyhow::anyhow!(
                "the server answered HTTP {code} for {url}: the file is not there; check --url"
            )))
        }
        Err(ureq::Error::StatusCode(code)) => {
            return Err(Failure::Retry(format!("the server answered HTTP {code} for {url}")))
        }
        Err(e @ (ureq::Error::BadUri(_) | ureq::Error::Http(_))) => {
            return Err(fatal(anyhow::anyhow!("`{url}` is not a valid http(s) URL ({e}); check --url")))
        }
        Err(ureq::Error::Timeout(what)) => {
            return Err(Failure::Retry(format!("no answer from {url} (timed out: {what})")))
        }
        Err(e) => return Err(Failure::Retry(format!("downloading {url}: {e}"))),
    };
    let resumed = resp.status().as_u16() == 206;
    let total_left: Option<u64> =
        resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let start = if resumed { have } else { 0 };
    let total = total_left.map(|n| n + start).or(remote.len);
    let io = |e: std::io::Error| fatal(anyhow::anyhow!("writing {}: {e}", part.display()));
    let mut file = if resumed {
        std::fs::OpenOptions::new().append(true).open(part).map_err(io)?
    } else {
        std::fs::File::create(part).map_err(io)?
    };
    let bar = if show_progress {
        let b = indicatif::ProgressBar::new(total.unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_message(if resumed { "resuming" } else { "downloading" });
        b.set_position(start);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    // The body is read on its own thread so that a server that stops sending is noticed: ureq has
    // no idle timeout for a body, only a total one, which no size of archive fits.
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(4);
    let mut reader = resp.into_body().into_reader();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let chunk = reader.read(&mut buf).map(|n| buf[..n].to_vec());
            let end = !matches!(&chunk, Ok(c) if !c.is_empty());
            if tx.send(chunk).is_err() || end {
                return;
            }
        }
    });
    let mut got = start;
    loop {
        let chunk = match rx.recv_timeout(patience.stall) {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(e)) => {
                return Err(Failure::Retry(format!("the connection to {url} was lost after {got} bytes ({e})")))
            }
            Err(_) => {
                bar.set_message("stalled");
                return Err(Failure::Retry(format!(
                    "the download of {url} stalled: no data for {:.0} s after {got} bytes",
                    patience.stall.as_secs_f64()
                )));
            }
        };
        if chunk.is_empty() {
            break;
        }
        file.write_all(&chunk).map_err(io)?;
        got += chunk.len() as u64;
        bar.inc(chunk.len() as u64);
    }
    file.sync_all().map_err(io)?;
    bar.finish_and_clear();
    Ok(())
}

fn finish(remote: &Remote, part: &Path, dest: &Path) -> Result<PathBuf> {
    let got = remote.checksum.of_file(part)?;
    if got != remote.checksum.expected() {
        std::fs::remove_file(part).ok();
        bail!(
            "the downloaded file is corrupt ({} {got}, expected {}); it was removed: run the command again",
            remote.checksum.name(),
            remote.checksum.expected()
        );
    }
    std::fs::rename(part, dest)?;
    Ok(dest.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    /// A one-file HTTP server on loopback that honours `Range: bytes=N-` and serves `requests` requests.
    fn serve(body: Vec<u8>, requests: usize, cut_first_at: Option<usize>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for i in 0..requests {
                let (mut stream, _) = listener.accept().unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut from = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        from = r.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                let slice = &body[from..];
                let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
                let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", slice.len());
                stream.write_all(head.as_bytes()).unwrap();
                let send = match (i, cut_first_at) {
                    (0, Some(cut)) => &slice[..cut],
                    _ => slice,
                };
                let _ = stream.write_all(send);
            }
        });
        format!("http://{addr}/archive.tar.gz")
    }

    fn remote(url: String, body: &[u8]) -> Remote {
        Remote { url, checksum: Checksum::Sha256(format!("{:x}", Sha256::digest(body))), len: Some(body.len() as u64) }
    }

    fn quick() -> Patience {
        Patience {
            connect: Duration::from_millis(500),
            answer: Duration::from_millis(500),
            stall: Duration::from_millis(500),
            attempts: 2,
            backoff: Duration::from_millis(10),
        }
    }

    #[test]
    fn md5_and_sha256_checksums_are_the_published_digests() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("abc");
        std::fs::write(&f, "abc").unwrap();
        // RFC 1321 and FIPS 180-2 test vectors.
        assert_eq!(Checksum::Md5(String::new()).of_file(&f).unwrap(), "900150983cd24fb0d6963f7d28e17f72");
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Checksum::Sha256(String::new()).of_file(&f).unwrap(), sha);
        assert!(Checksum::Sha256(sha.into()).matches(&f).unwrap());
        assert!(!Checksum::Md5(sha.into()).matches(&f).unwrap());
    }

    #[test]
    fn downloads_verifies_and_resumes() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.tar.gz");
        // The first connection drops half-way: the second attempt resumes from the part file.
        let url = serve(body.clone(), 2, Some(50_000));
        let r = remote(url, &body);
        let got = download_with(&r, &dest, false, &quick()).unwrap();
        assert_eq!(std::fs::read(got).unwrap(), body);
        // Already there and valid: no network needed.
        let offline = Remote { url: "http://127.0.0.1:1/x".into(), ..r };
        download_with(&offline, &dest, false, &quick()).unwrap();
    }

    #[test]
    fn a_silent_or_stalled_server_times_out_and_bad_urls_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let r = |url: String| Remote { url, checksum: Checksum::Sha256("00".repeat(32)), len: None };
        // Accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x.tar.gz", silent.local_addr().unwrap());
        let keep = std::thread::spawn(move || {
            let held: Vec<_> = silent.incoming().take(2).collect();
            std::thread::sleep(Duration::from_secs(3));
            drop(held);
        });
        let msg = download_with(&r(url), &dir.path().join("s.tar.gz"), false, &quick()).unwrap_err().to_string();
        assert!(msg.contains("no answer") && msg.contains("2 attempts"), "{msg}");
        // Answers, sends 100 KB, then stalls (the body is longer than what it sends).
        let stall = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x.tar.gz", stall.local_addr().unwrap());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in stall.incoming().take(2) {
                let mut s = s.unwrap();
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n");
                let _ = s.write_all(&vec![7u8; 100_000]);
                held.push(s);
            }
            std::thread::sleep(Duration::from_secs(3));
        });
        let msg = download_with(&r(url), &dir.path().join("t.tar.gz"), false, &quick()).unwrap_err().to_string();
        assert!(msg.contains("stalled"), "{msg}");
        // A 404 and a malformed URL are not network trouble.
        let nf = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/missing.tar.gz", nf.local_addr().unwrap());
        std::thread::spawn(move || {
            if let Some(Ok(mut s)) = nf.incoming().next() {
                let mut line = String::new();
                let mut rd = std::io::BufReader::new(s.try_clone().unwrap());
                while rd.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        });
        let msg = download_with(&r(url), &dir.path().join("n.tar.gz"), false, &quick()).unwrap_err().to_string();
        assert!(msg.contains("HTTP 404") && msg.contains("--url"), "{msg}");
        let msg = download_with(&r("not a url".into()), &dir.path().join("m.tar.gz"), false, &quick())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a valid") && msg.contains("--url"), "{msg}");
        drop(keep);
    }

    #[test]
    fn corrupt_download_is_removed_with_a_clear_message() {
        let body = vec![1u8; 10_000];
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.tar.gz");
        let url = serve(body.clone(), 1, None);
        let r = Remote { url, checksum: Checksum::Sha256("00".repeat(32)), len: None };
        let msg = download_with(&r, &dest, false, &quick()).unwrap_err().to_string();
        assert!(msg.contains("corrupt"), "{msg}");
        assert!(!dest.exists() && !dest.with_extension("gz.part").exists());
    }
}
