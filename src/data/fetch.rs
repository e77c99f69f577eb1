//! Downloads a dataset archive with a progress bar, resuming a partial file and verifying its SHA-256.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// An archive to fetch.
#[derive(Debug, Clone)]
pub struct Remote {
    pub url: String,
    pub sha256: String,
    /// Expected size in bytes, when known (shown before the server answers).
    pub len: Option<u64>,
}

/// The official CIFAR-10 binary archive.
pub fn cifar10() -> Remote {
    Remote {
        url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz".into(),
        sha256: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd".into(),
        len: Some(170_052_171),
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Downloads `remote` to `dest`. A complete, verified `dest` is kept as it is; a `dest.part` left by an
/// interrupted download is resumed (HTTP Range) or restarted when the server cannot resume. A file whose
/// checksum does not match is removed and reported.
pub fn download(remote: &Remote, dest: &Path, show_progress: bool) -> Result<PathBuf> {
    if dest.is_file() {
        if sha256_file(dest)? == remote.sha256 {
            return Ok(dest.to_path_buf());
        }
        bail!(
            "{} exists but its SHA-256 does not match the official archive: it is corrupt or a different file; delete it and run the command again",
            dest.display()
        );
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let part = dest.with_extension("gz.part");
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);

    let mut req = ureq::get(&remote.url);
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::StatusCode(416)) => {
            // The part file is already whole (or longer than the file): verify it below.
            return finish(remote, &part, dest);
        }
        Err(e) => bail!(
            "downloading {}: {e}; check the network and run the command again (a partial file is resumed)",
            remote.url
        ),
    };
    let resumed = resp.status().as_u16() == 206;
    let total_left: Option<u64> =
        resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let start = if resumed { have } else { 0 };
    let total = total_left.map(|n| n + start).or(remote.len);

    let mut file =
        if resumed { std::fs::OpenOptions::new().append(true).open(&part)? } else { std::fs::File::create(&part)? };
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
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).with_context(|| {
            format!("connection lost while downloading {}; run the command again to resume", remote.url)
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    file.sync_all()?;
    bar.finish_and_clear();
    finish(remote, &part, dest)
}

fn finish(remote: &Remote, part: &Path, dest: &Path) -> Result<PathBuf> {
    let got = sha256_file(part)?;
    if got != remote.sha256 {
        std::fs::remove_file(part).ok();
        bail!(
            "the downloaded file is corrupt (sha256 {got}, expected {}); it was removed: run the command again",
            remote.sha256
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
        Remote { url, sha256: format!("{:x}", Sha256::digest(body)), len: Some(body.len() as u64) }
    }

    #[test]
    fn downloads_verifies_and_resumes() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.tar.gz");
        // First connection drops half-way: the error says to run again, the part file stays.
        let url = serve(body.clone(), 2, Some(50_000));
        let r = remote(url, &body);
        let first = download(&r, &dest, false);
        assert!(first.is_err(), "a truncated transfer must fail the checksum or the read");
        let part = dest.with_extension("gz.part");
        if part.exists() {
            // Resume from where it stopped.
            assert!(std::fs::metadata(&part).unwrap().len() <= 50_000);
        }
        let got = download(&r, &dest, false).unwrap();
        assert_eq!(std::fs::read(got).unwrap(), body);
        // Already there and valid: no network needed.
        let offline = Remote { url: "http://127.0.0.1:1/x".into(), ..r };
        download(&offline, &dest, false).unwrap();
    }

    #[test]
    fn corrupt_download_is_removed_with_a_clear_message() {
        let body = vec![1u8; 10_000];
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.tar.gz");
        let url = serve(body.clone(), 1, None);
        let r = Remote { url, sha256: "00".repeat(32), len: None };
        let msg = download(&r, &dest, false).unwrap_err().to_string();
        assert!(msg.contains("corrupt"), "{msg}");
        assert!(!dest.exists() && !dest.with_extension("gz.part").exists());
    }
}
