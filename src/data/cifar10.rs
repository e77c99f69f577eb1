//! CIFAR-10 in the official binary layout: `data_batch_{1..5}.bin` and `test_batch.bin`, 3,073 bytes a
//! record (label, then 1,024 red, green and blue bytes), read from a folder or straight from the `.tar.gz`.

use super::{RawDataset, Split};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where `qat-lab data fetch cifar10` puts the archive and where presets look by default.
pub const DEFAULT_DIR: &str = "data/cifar10";
/// File name of the official archive.
pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
pub const CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
/// Images in the official training and test sets.
pub const TRAIN_LEN: usize = 50_000;
pub const TEST_LEN: usize = 10_000;
const RECORD: usize = 3073;
const PIXELS: usize = 3072;

/// Loads from a `.tar.gz`, a folder holding the `.bin` files (or a `cifar-10-batches-bin` folder), or a
/// folder holding the archive.
pub fn load(path: &Path) -> Result<RawDataset> {
    if !path.exists() {
        bail!(
            "CIFAR-10 not found at {}: run `qat-lab data fetch cifar10` (downloads {ARCHIVE_NAME}, 163 MiB), \
             or set data.path to a folder with the .bin files or to the .tar.gz",
            path.display()
        );
    }
    if path.is_file() {
        return load_archive(path);
    }
    if !path.is_dir() {
        bail!(
            "{} is neither a file nor a folder: data.path must be the CIFAR-10 .tar.gz or a folder with its .bin files",
            path.display()
        );
    }
    for dir in [path.to_path_buf(), path.join("cifar-10-batches-bin")] {
        if dir.join(TEST_BATCH).is_file() {
            return load_folder(&dir);
        }
    }
    let archive = path.join(ARCHIVE_NAME);
    if archive.is_file() {
        return load_archive(&archive);
    }
    // Any other .tar.gz in the folder (e.g. the sample archive).
    if let Some(p) =
        std::fs::read_dir(path)?.flatten().map(|e| e.path()).find(|p| p.to_string_lossy().ends_with(".tar.gz"))
    {
        return load_archive(&p);
    }
    bail!(
        "{} holds neither test_batch.bin nor a CIFAR-10 .tar.gz: run `qat-lab data fetch cifar10` or point data.path at the data",
        path.display()
    )
}

/// The official training batch names, in order; nothing else beside them is read (a stray
/// `data_batch_1.bin.orig` is not a sixth batch).
const TRAIN_BATCHES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
const TEST_BATCH: &str = "test_batch.bin";

fn load_folder(dir: &Path) -> Result<RawDataset> {
    let mut train = Split::default();
    let batches: Vec<PathBuf> = TRAIN_BATCHES.iter().map(|n| dir.join(n)).filter(|p| p.is_file()).collect();
    if batches.is_empty() {
        bail!("{}: none of {} is there", dir.display(), TRAIN_BATCHES.join(", "));
    }
    let read = |b: &Path, out: &mut Split| -> Result<()> {
        let name = b.display().to_string();
        check_batch_size(std::fs::metadata(b).map(|m| m.len()).unwrap_or(0), &name)?;
        let bytes = std::fs::read(b).with_context(|| format!("reading {name}"))?;
        parse_records(&bytes, &name, out)
    };
    for b in &batches {
        read(b, &mut train)?;
    }
    let mut test = Split::default();
    read(&dir.join(TEST_BATCH), &mut test)?;
    Ok(dataset(train, test))
}

fn load_archive(path: &Path) -> Result<RawDataset> {
    let mut magic = [0u8; 2];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    if read.is_err() || magic != [0x1f, 0x8b] {
        bail!(
            "{} is not a .tar.gz (it does not start with the gzip signature): data.path must be the CIFAR-10 binary archive ({ARCHIVE_NAME}) or a folder with its .bin files",
            path.display()
        );
    }
    verify_official_checksum(path)?;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut train_parts: Vec<(String, Vec<u8>)> = Vec::new();
    let mut test = Split::default();
    let corrupt = |e: std::io::Error| {
        anyhow::anyhow!(
            "{} is not a readable .tar.gz ({e}); it may be truncated or corrupt: if it came from `qat-lab data fetch cifar10`, delete it and fetch again",
            path.display()
        )
    };
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let name = entry.path().map_err(corrupt)?.to_string_lossy().to_string();
        let file = name.rsplit('/').next().unwrap_or("").to_string();
        if TRAIN_BATCHES.contains(&file.as_str()) || file == TEST_BATCH {
            let name = format!("{} ({name})", path.display());
            check_batch_size(entry.size(), &name)?;
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).map_err(corrupt)?;
            if file == TEST_BATCH {
                parse_records(&buf, &name, &mut test)?;
            } else {
                train_parts.push((file, buf));
            }
        }
    }
    // tar stops at its end marker; read the gzip stream to its end so that its CRC and length are
    // checked (a flipped bit or a cut trailer is an error, not 10 changed pixels).
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
    if train_parts.is_empty() || test.is_empty() {
        bail!("{} holds no data_batch_*.bin or no test_batch.bin: not a CIFAR-10 binary archive", path.display());
    }
    train_parts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut train = Split::default();
    for (name, bytes) in &train_parts {
        parse_records(bytes, name, &mut train)?;
    }
    Ok(dataset(train, test))
}

/// A file named and sized like the official archive must be it, byte for byte.
fn verify_official_checksum(path: &Path) -> Result<()> {
    let official = super::fetch::cifar10();
    let named = path.file_name().is_some_and(|n| n == ARCHIVE_NAME);
    let sized = std::fs::metadata(path).ok().map(|m| m.len()) == official.len;
    if named && sized && super::fetch::sha256_file(path)? != official.sha256 {
        bail!(
            "{} has the official archive's name and size but not its SHA-256: it is corrupt; delete it and run `qat-lab data fetch cifar10`",
            path.display()
        );
    }
    Ok(())
}

fn dataset(train: Split, test: Split) -> RawDataset {
    RawDataset {
        task: super::Task::Classify,
        name: "cifar10".into(),
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
        shape: [3, 32, 32],
        train,
        test,
    }
}

/// The largest batch file read: the whole official training set in one file. A larger one (a
/// corrupt header, a decompression bomb) is refused before it is read into memory.
const MAX_BATCH_RECORDS: u64 = TRAIN_LEN as u64;

fn check_batch_size(bytes: u64, name: &str) -> Result<()> {
    if bytes > MAX_BATCH_RECORDS * RECORD as u64 {
        bail!(
            "{name}: {bytes} bytes is more than {MAX_BATCH_RECORDS} CIFAR-10 records (an official batch holds 10,000): corrupt or not CIFAR-10"
        );
    }
    Ok(())
}

/// Appends the records of one batch file to `out`, checking length and labels.
pub fn parse_records(bytes: &[u8], name: &str, out: &mut Split) -> Result<()> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        bail!(
            "{name}: {} bytes is not a whole number of 3,073-byte CIFAR-10 records (corrupt or wrong file)",
            bytes.len()
        );
    }
    for rec in bytes.chunks_exact(RECORD) {
        if rec[0] > 9 {
            bail!("{name}: label {} is not a CIFAR-10 class (0-9): corrupt file", rec[0]);
        }
        out.labels.push(rec[0] as u32);
        out.images.extend(rec[1..].iter().map(|&b| b as f32 / 255.0));
    }
    debug_assert_eq!(out.images.len(), out.labels.len() * PIXELS);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `n` records whose label is i % 10 and whose pixels encode the label.
    pub fn fake_batch(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * RECORD);
        for i in 0..n {
            v.push((i % 10) as u8);
            v.extend(std::iter::repeat_n((i % 10) as u8 * 20, PIXELS));
        }
        v
    }

    pub fn write_fake_archive(path: &Path, n_train: usize, n_test: usize) {
        let f = std::fs::File::create(path).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (name, n) in [("data_batch_1.bin", n_train), ("test_batch.bin", n_test)] {
            let data = fake_batch(n);
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, format!("cifar-10-batches-bin/{name}"), &data[..]).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn reads_archive_and_folder_alike() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join(ARCHIVE_NAME);
        write_fake_archive(&archive, 30, 10);
        let a = load(&archive).unwrap();
        let b = load(dir.path()).unwrap();
        assert_eq!(a.train.len(), 30);
        assert_eq!(a.test.len(), 10);
        assert_eq!(a.train.labels, b.train.labels);

        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("data_batch_1.bin"), fake_batch(20)).unwrap();
        std::fs::write(bin.join("test_batch.bin"), fake_batch(5)).unwrap();
        // Only the official names are read: a backup beside a batch is not another batch.
        std::fs::write(bin.join("data_batch_1.bin.orig"), fake_batch(20)).unwrap();
        let c = load(&bin).unwrap();
        assert_eq!(c.train.len(), 20);
        assert!((c.train.images[PIXELS] - 20.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn a_batch_entry_claiming_gigabytes_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.tar.gz");
        let mut h = tar::Header::new_gnu();
        h.set_path("cifar-10-batches-bin/test_batch.bin").unwrap();
        h.set_size(4 << 30);
        h.set_mode(0o644);
        h.set_cksum();
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, h.as_bytes()).unwrap();
        gz.finish().unwrap();
        let msg = format!("{:#}", load(&path).unwrap_err());
        assert!(msg.contains("bomb.tar.gz (cifar-10-batches-bin/test_batch.bin)"), "{msg}");
        assert!(msg.contains("4294967296 bytes is more than 50000 CIFAR-10 records"), "{msg}");
    }

    #[test]
    fn corrupt_inputs_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let msg = load(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(msg.contains("qat-lab data fetch cifar10"), "{msg}");

        let truncated = dir.path().join("t.tar.gz");
        write_fake_archive(&truncated, 30, 10);
        let bytes = std::fs::read(&truncated).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let msg = format!("{:#}", load(&truncated).unwrap_err());
        assert!(msg.contains("truncated") || msg.contains("corrupt"), "{msg}");

        let own = dir.path().join("Cargo.toml");
        std::fs::write(&own, "[package]\n").unwrap();
        let msg = load(&own).unwrap_err().to_string();
        assert!(msg.contains("not a .tar.gz") && !msg.contains("delete"), "{msg}");
        #[cfg(unix)]
        {
            let msg = load(Path::new("/dev/null")).unwrap_err().to_string();
            assert!(msg.contains("neither a file nor a folder"), "{msg}");
        }

        // A cut gzip trailer, and single flipped bits in the compressed stream, are refused.
        let whole = dir.path().join("w.tar.gz");
        write_fake_archive(&whole, 30, 10);
        let bytes = std::fs::read(&whole).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() - 8]).unwrap();
        assert!(load(&truncated).is_err(), "an archive without its gzip trailer loaded");
        // (The fake pixels repeat, so a flip may only change a back-reference into one that copies
        // the same bytes: such an archive is intact and may load, but never with changed pixels.)
        let original = load(&whole).unwrap();
        let mut silent = Vec::new();
        for k in 0..48 {
            let mut flipped = bytes.clone();
            let at = 20 + (k * 7919) % (bytes.len() - 28);
            flipped[at] ^= 1 << (k % 8);
            std::fs::write(&truncated, &flipped).unwrap();
            if let Ok(d) = load(&truncated) {
                if d.train.images != original.train.images || d.test.images != original.test.images {
                    silent.push(at);
                }
            }
        }
        assert!(silent.is_empty(), "archives with a flipped bit at {silent:?} loaded with changed pixels");

        let mut out = Split::default();
        let msg = parse_records(&[1, 2, 3], "x.bin", &mut out).unwrap_err().to_string();
        assert!(msg.contains("3,073"), "{msg}");
    }
}
