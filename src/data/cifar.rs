//! CIFAR-10 and CIFAR-100 in their official binary layouts, read from a folder or straight from the
//! `.tar.gz`. A CIFAR-10 record is a label byte and 3,072 pixel bytes (1,024 red, green, blue), in
//! five training batches; a CIFAR-100 record has a coarse and a fine label byte before the pixels, in
//! one `train.bin`. The fine labels are the classes.

use super::{fetch, RawDataset, Split};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One of the two official binary layouts, and where it lives.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The dataset's name in presets, and the `data fetch` argument.
    pub name: &'static str,
    /// As messages print it.
    pub title: &'static str,
    /// Where `qat-lab data fetch` puts the archive and where presets look by default.
    pub default_dir: &'static str,
    /// File name of the official archive.
    pub archive_name: &'static str,
    /// The folder the archive unpacks to.
    folder: &'static str,
    /// The official training file names, in order; nothing else beside them is read (a stray
    /// `data_batch_1.bin.orig` is not a sixth batch).
    train_files: &'static [&'static str],
    test_file: &'static str,
    /// Label bytes before the pixels; the last one is the class (CIFAR-100: coarse, then fine).
    label_bytes: usize,
    pub classes: &'static [&'static str],
    /// Images in the official training and test sets.
    pub train_len: usize,
    pub test_len: usize,
    /// The official archive.
    pub remote: fn() -> fetch::Remote,
}

/// CIFAR-10 (Krizhevsky 2009).
pub const CIFAR10: Layout = Layout {
    name: "cifar10",
    title: "CIFAR-10",
    default_dir: "data/cifar10",
    archive_name: "cifar-10-binary.tar.gz",
    folder: "cifar-10-batches-bin",
    train_files: &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"],
    test_file: "test_batch.bin",
    label_bytes: 1,
    classes: &["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    train_len: 50_000,
    test_len: 10_000,
    remote: fetch::cifar10,
};

/// CIFAR-100, with its 100 fine classes (in the order of `fine_label_names.txt`).
pub const CIFAR100: Layout = Layout {
    name: "cifar100",
    title: "CIFAR-100",
    default_dir: "data/cifar100",
    archive_name: "cifar-100-binary.tar.gz",
    folder: "cifar-100-binary",
    train_files: &["train.bin"],
    test_file: "test.bin",
    label_bytes: 2,
    classes: &CIFAR100_CLASSES,
    train_len: 50_000,
    test_len: 10_000,
    remote: fetch::cifar100,
};

const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

const PIXELS: usize = 3072;

/// The layout of a CIFAR dataset kind; `None` for the others.
pub fn layout(kind: crate::config::DatasetKind) -> Option<&'static Layout> {
    match kind {
        crate::config::DatasetKind::Cifar10 => Some(&CIFAR10),
        crate::config::DatasetKind::Cifar100 => Some(&CIFAR100),
        _ => None,
    }
}

impl Layout {
    /// Bytes in one record: the label bytes and the pixels.
    pub fn record_len(&self) -> usize {
        self.label_bytes + PIXELS
    }

    /// Loads from a `.tar.gz`, a folder holding the `.bin` files (or the archive's own folder), or a
    /// folder holding the archive.
    pub fn load(&self, path: &Path) -> Result<RawDataset> {
        let (title, name, archive) = (self.title, self.name, self.archive_name);
        if !path.exists() {
            bail!(
                "{title} not found at {}: run `qat-lab data fetch {name}` (downloads {archive}, {} MiB), \
                 or set data.path to a folder with the .bin files or to the .tar.gz",
                path.display(),
                (self.remote)().len.unwrap_or(0) >> 20
            );
        }
        if path.is_file() {
            return self.load_archive(path);
        }
        if !path.is_dir() {
            bail!(
                "{} is neither a file nor a folder: data.path must be the {title} .tar.gz or a folder with its .bin files",
                path.display()
            );
        }
        for dir in [path.to_path_buf(), path.join(self.folder)] {
            if dir.join(self.test_file).is_file() {
                return self.load_folder(&dir);
            }
        }
        if path.join(archive).is_file() {
            return self.load_archive(&path.join(archive));
        }
        // Any other .tar.gz in the folder (e.g. the sample archive).
        if let Some(p) =
            std::fs::read_dir(path)?.flatten().map(|e| e.path()).find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        {
            return self.load_archive(&p);
        }
        bail!(
            "{} holds neither {} nor a {title} .tar.gz: run `qat-lab data fetch {name}` or point data.path at the data",
            path.display(),
            self.test_file
        )
    }

    fn load_folder(&self, dir: &Path) -> Result<RawDataset> {
        let batches: Vec<PathBuf> = self.train_files.iter().map(|n| dir.join(n)).filter(|p| p.is_file()).collect();
        if batches.is_empty() {
            bail!("{}: none of {} is there", dir.display(), self.train_files.join(", "));
        }
        let read = |b: &Path, out: &mut Split| -> Result<()> {
            let name = b.display().to_string();
            self.check_batch_size(std::fs::metadata(b).map(|m| m.len()).unwrap_or(0), &name)?;
            let bytes = std::fs::read(b).with_context(|| format!("reading {name}"))?;
            self.parse_records(&bytes, &name, out)
        };
        let mut train = Split::default();
        for b in &batches {
            read(b, &mut train)?;
        }
        let mut test = Split::default();
        read(&dir.join(self.test_file), &mut test)?;
        Ok(self.dataset(train, test))
    }

    fn load_archive(&self, path: &Path) -> Result<RawDataset> {
        let (title, name) = (self.title, self.name);
        let mut magic = [0u8; 2];
        let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
        if read.is_err() || magic != [0x1f, 0x8b] {
            bail!(
                "{} is not a .tar.gz (it does not start with the gzip signature): data.path must be the {title} binary archive ({}) or a folder with its .bin files",
                path.display(),
                self.archive_name
            );
        }
        self.verify_official_checksum(path)?;
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
        let mut train_parts: Vec<(String, Vec<u8>)> = Vec::new();
        let mut test = Split::default();
        let corrupt = |e: std::io::Error| {
            anyhow::anyhow!(
                "{} is not a readable .tar.gz ({e}); it may be truncated or corrupt: if it came from `qat-lab data fetch {name}`, delete it and fetch again",
                path.display()
            )
        };
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            let entry_name = entry.path().map_err(corrupt)?.to_string_lossy().to_string();
            let file = entry_name.rsplit('/').next().unwrap_or("").to_string();
            if self.train_files.contains(&file.as_str()) || file == self.test_file {
                let label = format!("{} ({entry_name})", path.display());
                self.check_batch_size(entry.size(), &label)?;
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf).map_err(corrupt)?;
                if file == self.test_file {
                    self.parse_records(&buf, &label, &mut test)?;
                } else {
                    train_parts.push((file, buf));
                }
            }
        }
        // tar stops at its end marker; read the gzip stream to its end so that its CRC and length are
        // checked (a flipped bit or a cut trailer is an error, not 10 changed pixels).
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
        if train_parts.is_empty() || test.is_empty() {
            bail!(
                "{} holds no {} or no {}: not a {title} binary archive",
                path.display(),
                self.train_files.join(" / "),
                self.test_file
            );
        }
        train_parts.sort_by(|a, b| a.0.cmp(&b.0));
        let mut train = Split::default();
        for (name, bytes) in &train_parts {
            self.parse_records(bytes, name, &mut train)?;
        }
        Ok(self.dataset(train, test))
    }

    /// A file named and sized like the official archive must be it, byte for byte.
    fn verify_official_checksum(&self, path: &Path) -> Result<()> {
        let official = (self.remote)();
        let named = path.file_name().is_some_and(|n| n == self.archive_name);
        let sized = std::fs::metadata(path).ok().map(|m| m.len()) == official.len;
        if named && sized && !official.checksum.matches(path)? {
            bail!(
                "{} has the official archive's name and size but not its {}: it is corrupt; delete it and run `qat-lab data fetch {}`",
                path.display(),
                official.checksum.name(),
                self.name
            );
        }
        Ok(())
    }

    fn dataset(&self, train: Split, test: Split) -> RawDataset {
        RawDataset {
            task: super::Task::Classify,
            name: self.name.into(),
            classes: self.classes.iter().map(|s| s.to_string()).collect(),
            shape: [3, 32, 32],
            train,
            test,
        }
    }

    /// The largest batch file read is the whole official training set in one file. A larger one (a
    /// corrupt header, a decompression bomb) is refused before it is read into memory.
    fn check_batch_size(&self, bytes: u64, name: &str) -> Result<()> {
        let most = self.train_len as u64;
        if bytes > most * self.record_len() as u64 {
            bail!("{name}: {bytes} bytes is more than {most} {} records: corrupt or not {}", self.title, self.title);
        }
        Ok(())
    }

    /// Appends the records of one batch file to `out`, checking length and labels.
    pub fn parse_records(&self, bytes: &[u8], name: &str, out: &mut Split) -> Result<()> {
        let record = self.record_len();
        if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
            bail!(
                "{name}: {} bytes is not a whole number of {}-byte {} records (corrupt or wrong file)",
                bytes.len(),
                thousands(record),
                self.title
            );
        }
        let classes = self.classes.len();
        for rec in bytes.chunks_exact(record) {
            let label = rec[self.label_bytes - 1] as usize;
            if label >= classes {
                bail!("{name}: label {label} is not a {} class (0-{}): corrupt file", self.title, classes - 1);
            }
            out.labels.push(label as u32);
            out.images.extend(rec[self.label_bytes..].iter().map(|&b| b as f32 / 255.0));
        }
        debug_assert_eq!(out.images.len(), out.labels.len() * PIXELS);
        Ok(())
    }
}

/// 3073 as "3,073".
fn thousands(n: usize) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        format!("{},{:03}", n / 1000, n % 1000)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `n` records whose label is i % 10 and whose pixels encode the label.
    pub fn fake_batch(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * CIFAR10.record_len());
        for i in 0..n {
            v.push((i % 10) as u8);
            v.extend(std::iter::repeat_n((i % 10) as u8 * 20, PIXELS));
        }
        v
    }

    pub fn write_fake_archive(path: &Path, n_train: usize, n_test: usize) {
        let entries = [("data_batch_1.bin", fake_batch(n_train)), ("test_batch.bin", fake_batch(n_test))];
        write_archive(path, "cifar-10-batches-bin", &entries);
    }

    /// A `.tar.gz` holding `folder/<name>` for each entry.
    fn write_archive(path: &Path, folder: &str, entries: &[(&str, Vec<u8>)]) {
        let f = std::fs::File::create(path).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(f, flate2::Compression::fast()));
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, format!("{folder}/{name}"), &data[..]).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn reads_archive_and_folder_alike() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join(CIFAR10.archive_name);
        write_fake_archive(&archive, 30, 10);
        let a = CIFAR10.load(&archive).unwrap();
        let b = CIFAR10.load(dir.path()).unwrap();
        assert_eq!(a.train.len(), 30);
        assert_eq!(a.test.len(), 10);
        assert_eq!(a.train.labels, b.train.labels);

        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("data_batch_1.bin"), fake_batch(20)).unwrap();
        std::fs::write(bin.join("test_batch.bin"), fake_batch(5)).unwrap();
        // Only the official names are read: a backup beside a batch is not another batch.
        std::fs::write(bin.join("data_batch_1.bin.orig"), fake_batch(20)).unwrap();
        let c = CIFAR10.load(&bin).unwrap();
        assert_eq!(c.train.len(), 20);
        assert!((c.train.images[PIXELS] - 20.0 / 255.0).abs() < 1e-6);
    }

    /// A CIFAR-100 record: coarse label, fine label, pixels.
    pub fn fake_cifar100(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..n {
            let fine = (i * 7 % 100) as u8;
            v.extend([fine / 5, fine]);
            v.extend(std::iter::repeat_n(fine, PIXELS));
        }
        v
    }

    #[test]
    fn cifar100_reads_the_fine_labels_from_archive_and_folder() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join(CIFAR100.archive_name);
        write_archive(
            &archive,
            "cifar-100-binary",
            &[("train.bin", fake_cifar100(120)), ("test.bin", fake_cifar100(30))],
        );
        let a = CIFAR100.load(&archive).unwrap();
        assert_eq!((a.train.len(), a.test.len(), a.classes.len()), (120, 30, 100));
        assert_eq!(&a.train.labels[..4], &[0, 7, 14, 21]);
        assert_eq!(a.classes[1], "aquarium_fish");
        assert!((a.train.images[PIXELS] - 7.0 / 255.0).abs() < 1e-6, "pixels start after both label bytes");
        assert_eq!(CIFAR100.load(dir.path()).unwrap().train.labels, a.train.labels);

        let bin = dir.path().join("cifar-100-binary");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("train.bin"), fake_cifar100(10)).unwrap();
        std::fs::write(bin.join("test.bin"), fake_cifar100(5)).unwrap();
        assert_eq!(CIFAR100.load(dir.path()).unwrap().train.len(), 10, "the unpacked folder comes first");

        let mut out = Split::default();
        let mut bad = fake_cifar100(2);
        bad[CIFAR100.record_len() + 1] = 100;
        let msg = CIFAR100.parse_records(&bad, "train.bin", &mut out).unwrap_err().to_string();
        assert!(msg.contains("label 100 is not a CIFAR-100 class (0-99)"), "{msg}");
        // A CIFAR-10 batch is not CIFAR-100 (3,073-byte records).
        let msg = CIFAR100.parse_records(&fake_batch(2), "x.bin", &mut out).unwrap_err().to_string();
        assert!(msg.contains("3,074-byte CIFAR-100 records"), "{msg}");
        let msg = CIFAR100.load(&dir.path().join("none")).unwrap_err().to_string();
        assert!(msg.contains("qat-lab data fetch cifar100"), "{msg}");
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
        let msg = format!("{:#}", CIFAR10.load(&path).unwrap_err());
        assert!(msg.contains("bomb.tar.gz (cifar-10-batches-bin/test_batch.bin)"), "{msg}");
        assert!(msg.contains("4294967296 bytes is more than 50000 CIFAR-10 records"), "{msg}");
    }

    #[test]
    fn corrupt_inputs_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let msg = CIFAR10.load(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(msg.contains("qat-lab data fetch cifar10"), "{msg}");

        let truncated = dir.path().join("t.tar.gz");
        write_fake_archive(&truncated, 30, 10);
        let bytes = std::fs::read(&truncated).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let msg = format!("{:#}", CIFAR10.load(&truncated).unwrap_err());
        assert!(msg.contains("truncated") || msg.contains("corrupt"), "{msg}");

        let own = dir.path().join("Cargo.toml");
        std::fs::write(&own, "[package]\n").unwrap();
        let msg = CIFAR10.load(&own).unwrap_err().to_string();
        assert!(msg.contains("not a .tar.gz") && !msg.contains("delete"), "{msg}");
        #[cfg(unix)]
        {
            let msg = CIFAR10.load(Path::new("/dev/null")).unwrap_err().to_string();
            assert!(msg.contains("neither a file nor a folder"), "{msg}");
        }

        // A cut gzip trailer, and single flipped bits in the compressed stream, are refused.
        let whole = dir.path().join("w.tar.gz");
        write_fake_archive(&whole, 30, 10);
        let bytes = std::fs::read(&whole).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() - 8]).unwrap();
        assert!(CIFAR10.load(&truncated).is_err(), "an archive without its gzip trailer loaded");
        // (The fake pixels repeat, so a flip may only change a back-reference into one that copies
        // the same bytes: such an archive is intact and may load, but never with changed pixels.)
        let original = CIFAR10.load(&whole).unwrap();
        let mut silent = Vec::new();
        for k in 0..48 {
            let mut flipped = bytes.clone();
            let at = 20 + (k * 7919) % (bytes.len() - 28);
            flipped[at] ^= 1 << (k % 8);
            std::fs::write(&truncated, &flipped).unwrap();
            if let Ok(d) = CIFAR10.load(&truncated) {
                if d.train.images != original.train.images || d.test.images != original.test.images {
                    silent.push(at);
                }
            }
        }
        assert!(silent.is_empty(), "archives with a flipped bit at {silent:?} loaded with changed pixels");

        let mut out = Split::default();
        let msg = CIFAR10.parse_records(&[1, 2, 3], "x.bin", &mut out).unwrap_err().to_string();
        assert!(msg.contains("3,073"), "{msg}");
    }
}
