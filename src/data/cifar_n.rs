//! CIFAR-N's human label sets (Wei et al., ICLR 2022): the official `CIFAR-10_human.pt` and
//! `CIFAR-100_human.pt`. Each is a PyTorch archive, a zip holding `archive/data.pkl`: a pickle of a
//! dict from set name to a numpy int64 array of 50,000 labels, in the order of the official training
//! set. candle's pickle reader gives the objects; this module reads exactly that layout and refuses
//! anything else, naming what it found.

use crate::config::{HumanLabels, NoiseConfig};
use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use std::io::Read;
use std::path::Path;

/// Where `qat-lab data fetch cifar10n` puts the label files, and where the presets look.
pub const DEFAULT_DIR: &str = "data/cifar-n";

/// The largest pickle read (the real files' are 2.4 MB and 1.0 MB).
const MAX_PICKLE: u64 = 64 << 20;

/// The label sets of a CIFAR-N file, as (name, labels) sorted by name.
pub fn read_label_sets(path: &Path) -> Result<Vec<(String, Vec<i64>)>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open the CIFAR-N label file {}: run `qat-lab data fetch cifar10n` or `cifar100n` (they save data/cifar-n/CIFAR-10_human.pt and CIFAR-100_human.pt), or set data.noise.labels to your copy",
            path.display()
        )
    })?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a PyTorch .pt archive (a zip): {e}; it may be truncated: download it again",
            path.display()
        )
    })?;
    let name = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).and_then(|n| n.ok()).map(|n| n.to_string()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .with_context(|| format!("{} holds no data.pkl: not a PyTorch .pt archive", path.display()))?;
    let mut entry = archive.by_name(&name).with_context(|| format!("{}: cannot read {name}", path.display()))?;
    if entry.size() > MAX_PICKLE {
        bail!(
            "{}: {name} is {} bytes, more than a CIFAR-N label file holds: not CIFAR-N",
            path.display(),
            entry.size()
        );
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut bytes).with_context(|| format!("{}: {name} is corrupt or truncated", path.display()))?;
    parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The file's clean labels and those of `noise.set`, as (clean, noisy).
pub fn clean_and_noisy(noise: &NoiseConfig, human: &HumanLabels) -> Result<(Vec<i64>, Vec<i64>)> {
    let path = Path::new(&noise.labels);
    let sets = read_label_sets(path)?;
    let key = human.key(&noise.set).unwrap_or("");
    let get = |k: &str| sets.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone());
    let (Some(clean), Some(noisy)) = (get("clean_label"), get(key)) else {
        let names: Vec<&str> = sets.iter().map(|(k, _)| k.as_str()).collect();
        bail!(
            "{} has no `clean_label` or no `{key}` (data.noise.set = \"{}\"); it holds {}: is it {}?",
            path.display(),
            noise.set,
            names.join(", "),
            human.file
        );
    };
    Ok((clean, noisy))
}

/// The training labels that `noise.set` of `noise.labels` gives a dataset whose own (clean) labels
/// are `clean`, in the same order; refused where the file does not belong to that data.
pub fn noisy_labels(noise: &NoiseConfig, human: &HumanLabels, clean: &[u32], classes: usize) -> Result<Vec<u32>> {
    let path = Path::new(&noise.labels);
    let key = human.key(&noise.set).unwrap_or("");
    let (file_clean, noisy) = clean_and_noisy(noise, human)?;
    if file_clean.len() != clean.len() || noisy.len() != clean.len() {
        bail!(
            "the dataset is not in the official order: {} labels {} training images but the dataset has {} (a subset or a shuffled copy, like the shared CIFAR-10 sample, cannot carry CIFAR-N's labels); use the whole official {}",
            path.display(),
            file_clean.len(),
            clean.len(),
            human.dataset
        );
    }
    if let Some(i) = file_clean.iter().zip(clean).position(|(&a, &b)| a != b as i64) {
        bail!(
            "the dataset is not in the official order: its training image {i} has class {} where {} says {} (a shuffled subset, like the shared CIFAR-10 sample, cannot carry CIFAR-N's labels); use the official {}",
            clean[i],
            path.display(),
            file_clean[i],
            human.dataset
        );
    }
    noisy
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            u32::try_from(y).ok().filter(|&y| (y as usize) < classes).with_context(|| {
                format!("{}: `{key}` gives image {i} the label {y}, outside the {classes} classes", path.display())
            })
        })
        .collect()
}

/// The dict of int64 arrays in a protocol-2 pickle.
pub fn parse(pickle: &[u8]) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    let mut stack = Stack::empty();
    stack.read_loop(&mut std::io::BufReader::new(pickle)).map_err(|e| format!("not a readable pickle ({e})"))?;
    let root = stack.finalize().map_err(|e| format!("not a readable pickle ({e})"))?;
    let Object::Dict(entries) = root else {
        return Err(format!("expected a dict of label arrays, found {}", kind(&root)));
    };
    let mut sets = entries
        .into_iter()
        .map(|(key, value)| {
            let Object::Unicode(name) = key else {
                return Err(format!("a key of the dict is {}, not a name", kind(&key)));
            };
            let labels = int64_array(value).map_err(|e| format!("`{name}`: {e}"))?;
            Ok((name, labels))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    sets.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(sets)
}

/// A one-dimensional little-endian int64 numpy array, as numpy pickles it: `_reconstruct` built with
/// the state (version, shape, dtype, is_fortran, raw bytes); or a plain list of integers (CIFAR-100N's
/// `noisy_coarse_label` is one).
fn int64_array(obj: Object) -> std::result::Result<Vec<i64>, String> {
    if let Object::List(items) = obj {
        return items
            .into_iter()
            .map(|v| match v {
                Object::Int(i) => Ok(i as i64),
                Object::Long(i) => Ok(i),
                other => Err(format!("a list holding {}, expected integers", kind(&other))),
            })
            .collect();
    }
    let Object::Build { callable, args } = obj else {
        return Err(format!("expected a numpy array, found {}", kind(&obj)));
    };
    match *callable {
        Object::Reduce { callable, .. } if is_class(&callable, "_reconstruct") => {}
        other => return Err(format!("expected a numpy array, found {}", kind(&other))),
    }
    let Object::Tuple(state) = *args else { return Err("a numpy array without its state tuple".into()) };
    let [_, shape, dtype, fortran, data] =
        <[Object; 5]>::try_from(state).map_err(|s| format!("a numpy array state of {} fields, expected 5", s.len()))?;
    let n = match shape {
        Object::Tuple(dims) if dims.len() == 1 => match dims[0] {
            Object::Int(n) if n >= 0 => n as usize,
            Object::Long(n) if n >= 0 => n as usize,
            _ => return Err("a numpy array with a non-integer length".into()),
        },
        Object::Tuple(dims) => return Err(format!("a {}-dimensional array, expected one dimension", dims.len())),
        other => return Err(format!("a numpy array whose shape is {}", kind(&other))),
    };
    check_int64(dtype)?;
    if fortran != Object::Bool(false) && n > 1 {
        return Err("a Fortran-ordered array".into());
    }
    let bytes = raw_bytes(data)?;
    if bytes.len() != 8 * n {
        return Err(format!("{} bytes of data for {n} int64 values", bytes.len()));
    }
    Ok(bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
}

/// `numpy.dtype('i8')` built with little-endian (or native) byte order. A dtype the pickle shares
/// between arrays comes back from its memo before its state was applied (candle's memo keeps the
/// object as first stored), so an unbuilt `dtype('i8')` is taken as the first one's.
fn check_int64(dtype: Object) -> std::result::Result<(), String> {
    let (callable, state) = match dtype {
        Object::Build { callable, args } => (callable, Some(args)),
        reduce @ Object::Reduce { .. } => (Box::new(reduce), None),
        other => return Err(format!("a dtype that is {}", kind(&other))),
    };
    let Object::Reduce { callable: class, args: type_args } = *callable else {
        return Err("an unreadable dtype".into());
    };
    if !is_class(&class, "dtype") {
        return Err(format!("a dtype that is {}", kind(&class)));
    }
    match *type_args {
        Object::Tuple(t) if t.first() == Some(&Object::Unicode("i8".into())) => {}
        Object::Tuple(t) => {
            let name = match t.first() {
                Some(Object::Unicode(s)) => s.clone(),
                _ => "?".into(),
            };
            return Err(format!("labels of dtype {name}, expected int64 (i8)"));
        }
        _ => return Err("an unreadable dtype".into()),
    }
    match state.map(|s| *s) {
        None => Ok(()),
        Some(Object::Tuple(t)) if matches!(t.get(1), Some(Object::Unicode(o)) if o == "<" || o == "=" || o == "|") => {
            Ok(())
        }
        Some(_) => Err("a big-endian or unreadable int64 dtype".into()),
    }
}

/// Python 3 bytes in a protocol-2 pickle: `_codecs.encode(text, 'latin1')`, one char per byte.
fn raw_bytes(data: Object) -> std::result::Result<Vec<u8>, String> {
    let Object::Reduce { callable, args } = data else { return Err(format!("array data that is {}", kind(&data))) };
    if !is_class(&callable, "encode") {
        return Err("array data that is not latin-1 encoded bytes".into());
    }
    let Object::Tuple(t) = *args else { return Err("unreadable array data".into()) };
    match t.as_slice() {
        [Object::Unicode(text), Object::Unicode(codec)] if codec == "latin1" => text
            .chars()
            .map(|c| u8::try_from(c as u32).map_err(|_| "array data with a character beyond latin-1".to_string()))
            .collect(),
        _ => Err("unreadable array data".into()),
    }
}

fn is_class(obj: &Object, name: &str) -> bool {
    matches!(obj, Object::Class { class_name, .. } if class_name == name)
}

/// What an object is, for messages.
fn kind(obj: &Object) -> String {
    match obj {
        Object::Class { module_name, class_name } => format!("the class {module_name}.{class_name}"),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Bool(_) => "a boolean".into(),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => {
            format!("an object made by {}", kind(callable))
        }
        Object::Mark | Object::PersistentLoad(_) => "an unsupported pickle object".into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A protocol-2 pickle of `{name: numpy int64 array}` laid out as numpy and torch write it, with
    /// `dtype` and the raw bytes given (so tests can make wrong ones).
    pub fn pickle(sets: &[(&str, &str, Vec<u8>, usize)]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        let unicode = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend((s.len() as u32).to_le_bytes());
            p.extend(s.as_bytes());
        };
        let global = |p: &mut Vec<u8>, m: &str, c: &str| p.extend(format!("c{m}\n{c}\n").bytes());
        for (name, dtype, data, n) in sets {
            unicode(&mut p, name);
            global(&mut p, "numpy.core.multiarray", "_reconstruct");
            global(&mut p, "numpy", "ndarray");
            p.extend([b'K', 0, 0x85]);
            global(&mut p, "_codecs", "encode");
            unicode(&mut p, "b");
            unicode(&mut p, "latin1");
            p.extend([0x86, b'R', 0x87, b'R']);
            p.extend([b'(', b'K', 1, b'J']);
            p.extend((*n as i32).to_le_bytes());
            p.push(0x85);
            global(&mut p, "numpy", "dtype");
            unicode(&mut p, dtype);
            p.extend([0x89, 0x88, 0x87, b'R']);
            p.extend([b'(', b'K', 3]);
            unicode(&mut p, "<");
            p.extend([
                b'N', b'N', b'N', b'J', 0xff, 0xff, 0xff, 0xff, b'J', 0xff, 0xff, 0xff, 0xff, b'K', 0, b't', b'b',
            ]);
            p.push(0x89);
            global(&mut p, "_codecs", "encode");
            let latin1: String = data.iter().map(|&b| b as char).collect();
            unicode(&mut p, &latin1);
            unicode(&mut p, "latin1");
            p.extend([0x86, b'R', b't', b'b']);
        }
        p.extend([b'u', b'.']);
        p
    }

    /// `labels` as int64 bytes.
    pub fn int64(labels: &[i64]) -> Vec<u8> {
        labels.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A .pt archive (stored zip) holding `pickle` as `archive/data.pkl`.
    pub fn write_pt(path: &Path, pickle: &[u8]) {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).unwrap();
        zip.write_all(pickle).unwrap();
        zip.start_file("archive/version", stored).unwrap();
        zip.write_all(b"3\n").unwrap();
        zip.finish().unwrap();
    }

    #[test]
    fn human_labels_replace_the_training_labels_of_data_in_the_official_order_only() {
        use crate::config::{DataConfig, DatasetKind, NoiseKind};
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // 40 training images labelled i % 10 (the fake batch's order is "official" here).
        std::fs::write(bin.join("data_batch_1.bin"), crate::data::cifar::tests::fake_batch(40)).unwrap();
        std::fs::write(bin.join("test_batch.bin"), crate::data::cifar::tests::fake_batch(10)).unwrap();
        let clean: Vec<i64> = (0..40).map(|i| i % 10).collect();
        // "worst" relabels every 4th image as the next class: 25% noise.
        let worst: Vec<i64> =
            clean.iter().enumerate().map(|(i, &c)| if i % 4 == 0 { (c + 1) % 10 } else { c }).collect();
        let pt = dir.path().join("CIFAR-10_human.pt");
        write_pt(&pt, &pickle(&[("clean_label", "i8", int64(&clean), 40), ("worse_label", "i8", int64(&worst), 40)]));
        let mut cfg =
            DataConfig { dataset: DatasetKind::Cifar10, path: bin.display().to_string(), ..Default::default() };
        cfg.noise.kind = NoiseKind::Human;
        cfg.noise.labels = pt.display().to_string();
        cfg.noise.set = "worst".into();
        let data = crate::data::load(&cfg).unwrap();
        assert_eq!(data.measured_noise_rate, 0.25);
        // Class 0 (images 0, 10, 20, 30) gives images 0 and 20 to class 1; class 1 keeps all of its own.
        assert_eq!((data.transition[0][0], data.transition[0][1], data.transition[1][1]), (0.5, 0.5, 1.0));
        assert_eq!(data.corrupted.iter().filter(|&&c| c).count(), 10);
        for (i, &noisy) in data.train.labels.iter().enumerate() {
            assert_eq!(data.corrupted[i], noisy != data.train_clean_labels[i]);
        }
        // A subset is drawn after the labels are matched, so it keeps them.
        cfg.train_subset = 20;
        let sub = crate::data::load(&cfg).unwrap();
        assert_eq!(sub.train.len(), 20);
        // Another order, or another size, is not the data the file labels.
        let shuffled: Vec<i64> = clean.iter().rev().copied().collect();
        write_pt(
            &pt,
            &pickle(&[("clean_label", "i8", int64(&shuffled), 40), ("worse_label", "i8", int64(&worst), 40)]),
        );
        let m = format!("{:#}", crate::data::load(&cfg).unwrap_err());
        assert!(m.contains("not in the official order") && m.contains("training image 0 has class 0"), "{m}");
        write_pt(
            &pt,
            &pickle(&[("clean_label", "i8", int64(&clean[..30]), 30), ("worse_label", "i8", int64(&worst[..30]), 30)]),
        );
        let m = format!("{:#}", crate::data::load(&cfg).unwrap_err());
        assert!(
            m.contains("not in the official order") && m.contains("labels 30 training images but the dataset has 40"),
            "{m}"
        );
        // A set the file lacks names what it holds.
        write_pt(&pt, &pickle(&[("clean_label", "i8", int64(&clean), 40)]));
        let m = format!("{:#}", crate::data::load(&cfg).unwrap_err());
        assert!(m.contains("no `worse_label`") && m.contains("it holds clean_label"), "{m}");
    }

    #[test]
    fn cifar100n_labels_the_fine_classes() {
        use crate::config::{DataConfig, DatasetKind, NoiseKind};
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("cifar-100-binary");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("train.bin"), crate::data::cifar::tests::fake_cifar100(100)).unwrap();
        std::fs::write(bin.join("test.bin"), crate::data::cifar::tests::fake_cifar100(10)).unwrap();
        let clean: Vec<i64> = (0..100).map(|i| i * 7 % 100).collect();
        // Every 5th image takes the next fine class: 20% noise.
        let noisy: Vec<i64> =
            clean.iter().enumerate().map(|(i, &c)| if i % 5 == 0 { (c + 1) % 100 } else { c }).collect();
        let pt = dir.path().join("CIFAR-100_human.pt");
        write_pt(&pt, &pickle(&[("clean_label", "i8", int64(&clean), 100), ("noisy_label", "i8", int64(&noisy), 100)]));
        let mut cfg =
            DataConfig { dataset: DatasetKind::Cifar100, path: dir.path().display().to_string(), ..Default::default() };
        cfg.noise.kind = NoiseKind::Human;
        cfg.noise.labels = pt.display().to_string();
        cfg.noise.set = "noisy".into();
        let data = crate::data::load(&cfg).unwrap();
        assert_eq!(data.measured_noise_rate, 0.2);
        assert_eq!(data.transition.len(), 100);
        assert_eq!(data.corrupted.iter().filter(|&&c| c).count(), 20);
        // CIFAR-10N's set names are not CIFAR-100N's.
        cfg.noise.set = "worst".into();
        let e = crate::config::Experiment { data: cfg, ..Default::default() };
        let m = e.validate().unwrap_err();
        assert!(m.contains("not a label set of CIFAR-100_human.pt; allowed: noisy"), "{m}");
    }

    #[test]
    fn reads_a_torch_archive_of_int64_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.pt");
        let clean = [6i64, 9, 9, 4, 1];
        write_pt(
            &path,
            &pickle(&[("clean_label", "i8", int64(&clean), 5), ("worse_label", "i8", int64(&[6, 1, 9, 4, 0]), 5)]),
        );
        let sets = read_label_sets(&path).unwrap();
        assert_eq!(
            sets,
            vec![("clean_label".to_string(), clean.to_vec()), ("worse_label".to_string(), vec![6, 1, 9, 4, 0])]
        );
    }

    #[test]
    fn refuses_a_truncated_archive_an_unexpected_type_and_a_wrong_length_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.pt");
        let err = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            format!("{:#}", read_label_sets(&path).unwrap_err())
        };
        write_pt(&path, &pickle(&[("clean_label", "i8", int64(&[1, 2, 3]), 3)]));
        let whole = std::fs::read(&path).unwrap();
        let m = err(&whole[..whole.len() / 2]);
        assert!(m.contains("not a PyTorch .pt archive") && m.contains("truncated"), "{m}");
        write_pt(&path, &pickle(&[("clean_label", "f8", int64(&[1, 2, 3]), 3)]));
        let m = format!("{:#}", read_label_sets(&path).unwrap_err());
        assert!(m.contains("`clean_label`: labels of dtype f8, expected int64"), "{m}");
        write_pt(&path, &pickle(&[("clean_label", "i8", int64(&[1, 2]), 3)]));
        let m = format!("{:#}", read_label_sets(&path).unwrap_err());
        assert!(m.contains("16 bytes of data for 3 int64 values"), "{m}");
        write_pt(&path, &[0x80, 2, b']', b'.']);
        let m = format!("{:#}", read_label_sets(&path).unwrap_err());
        assert!(m.contains("expected a dict of label arrays, found a list"), "{m}");
        // {"clean_label": 1.5}: neither an array nor a list of integers.
        let mut float = vec![0x80, 2, b'}', b'X', 11, 0, 0, 0];
        float.extend(b"clean_label");
        float.push(b'G');
        float.extend(1.5f64.to_be_bytes());
        float.extend([b's', b'.']);
        write_pt(&path, &float);
        let m = format!("{:#}", read_label_sets(&path).unwrap_err());
        assert!(m.contains("`clean_label`: expected a numpy array, found a float"), "{m}");
        assert!(
            format!("{:#}", read_label_sets(&dir.path().join("none.pt")).unwrap_err()).contains("data.noise.labels")
        );
    }

    /// The shared official files, when present.
    fn shared(name: &str) -> Option<std::path::PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/cifar-n").join(name);
        if !p.is_file() {
            eprintln!(
                "skipped: {} is absent (the official CIFAR-N files are in ../shared on the lab's machines)",
                p.display()
            );
            return None;
        }
        Some(p)
    }

    fn disagreement(sets: &[(String, Vec<i64>)], clean: &str, noisy: &str) -> f64 {
        let get = |n: &str| &sets.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("no {n}")).1;
        let (c, y) = (get(clean), get(noisy));
        c.iter().zip(y).filter(|(a, b)| a != b).count() as f64 / c.len() as f64
    }

    #[test]
    fn the_official_files_give_the_published_noise_rates() {
        if let Some(p) = shared("CIFAR-10_human.pt") {
            let sets = read_label_sets(&p).unwrap();
            let clean = &sets.iter().find(|(k, _)| k == "clean_label").unwrap().1;
            assert_eq!(clean.len(), 50_000);
            assert_eq!(&clean[..10], &[6, 9, 9, 4, 1, 1, 2, 7, 8, 3]);
            for (set, rate) in [
                ("aggre_label", 0.0901),
                ("random_label1", 0.1723),
                ("random_label2", 0.1812),
                ("random_label3", 0.1764),
                ("worse_label", 0.4021),
            ] {
                let got = disagreement(&sets, "clean_label", set);
                assert!((got - rate).abs() < 0.0001, "{set}: {got} vs the published {rate}");
            }
            // CIFAR-10 has 5,000 training images per class, so the diagonal's mean is 1 - the rate.
            let to_u32 = |v: &Vec<i64>| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
            let worst = &sets.iter().find(|(k, _)| k == "worse_label").unwrap().1;
            let m = crate::data::noise::transition_matrix(&to_u32(clean), &to_u32(worst), 10);
            let diagonal = (0..10).map(|i| m[i][i]).sum::<f64>() / 10.0;
            assert!((diagonal - (1.0 - 0.4021)).abs() < 0.0001, "{diagonal}");
            assert!(m.iter().all(|r| (r.iter().sum::<f64>() - 1.0).abs() < 1e-9));
        }
        if let Some(p) = shared("CIFAR-100_human.pt") {
            let sets = read_label_sets(&p).unwrap();
            let got = disagreement(&sets, "clean_label", "noisy_label");
            assert!((got - 0.4020).abs() < 0.0001, "CIFAR-100N noisy: {got}");
        }
    }
}
