//! The L2 cache size of the CPU the kernels run on, read once from what the OS reports (Linux
//! sysfs), so that working-set choices follow the machine instead of constants measured on one.
//! Where it cannot be read, the kernels assume 1 MiB per core (the smaller of the CPU kinds they
//! were measured on: AMD Zen 4/5 have 1 MiB, Intel Sapphire Rapids 2 MiB).

use std::sync::OnceLock;

/// The per-core cache the kernels size their working sets by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caches {
    /// L2 bytes per core.
    pub l2: usize,
    /// Whether the sizes were read from the system (false: the assumed defaults).
    pub detected: bool,
}

impl Caches {
    const ASSUMED: Caches = Caches { l2: 1 << 20, detected: false };
}

/// What was read once: the sizes the kernels use, and every data or unified level for display.
struct Detected {
    caches: Caches,
    levels: String,
}

fn detected() -> &'static Detected {
    static DETECTED: OnceLock<Detected> = OnceLock::new();
    DETECTED.get_or_init(|| read_sysfs(std::path::Path::new("/sys/devices/system/cpu/cpu0/cache")))
}

/// The caches of CPU 0, read on first use.
pub fn caches() -> Caches {
    detected().caches
}

/// The data and unified cache levels of CPU 0 and the L2 the kernels were sized for, e.g.
/// `L1d 32K, L2 1024K, L3 32768K; kernels sized for L2 1024K (detected)`.
pub fn description() -> String {
    let Detected { caches, levels } = detected();
    let source = if caches.detected { "detected" } else { "not detected: assumed" };
    format!("{levels}; kernels sized for L2 {}K ({source})", caches.l2 >> 10)
}

/// The L2 size and the levels from a sysfs cache folder (`index*/{level,type,size}`); the assumed L2
/// where it has none.
fn read_sysfs(dir: &std::path::Path) -> Detected {
    let (mut l2, mut levels) = (None, Vec::new());
    for i in 0..8 {
        let read = |f: &str| std::fs::read_to_string(dir.join(format!("index{i}/{f}"))).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size")) else { continue };
        let (level, kind, size) = (level.trim(), kind.trim(), size.trim());
        let suffix = match kind {
            "Instruction" => continue,
            "Data" => "d",
            _ => "",
        };
        levels.push(format!("L{level}{suffix} {size}"));
        if level == "2" {
            l2 = parse_size(size);
        }
    }
    let caches = l2.map_or(Caches::ASSUMED, |l2| Caches { l2, detected: true });
    let levels = if levels.is_empty() { "cache sizes unknown".to_string() } else { levels.join(", ") };
    Detected { caches, levels }
}

/// A sysfs size such as `32K`, `1024K` or `2M`, in bytes.
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok().filter(|&v| v > 0).map(|v| v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_sizes() {
        assert_eq!(parse_size("32K\n"), Some(32 << 10));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        for bad in ["", "K", "12Q", "0K", "-1K"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_the_l2_and_falls_back_when_it_is_missing() {
        let dir = std::env::temp_dir().join(format!("qat-lab-caches-{}", std::process::id()));
        let entries =
            [("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "2048K"), ("3", "Unified", "105M")];
        for (i, (level, kind, size)) in entries.iter().enumerate() {
            let index = dir.join(format!("index{i}"));
            std::fs::create_dir_all(&index).unwrap();
            for (file, value) in [("level", level), ("type", kind), ("size", size)] {
                std::fs::write(index.join(file), format!("{value}\n")).unwrap();
            }
        }
        let found = read_sysfs(&dir);
        assert_eq!(found.caches, Caches { l2: 2 << 20, detected: true });
        assert_eq!(found.levels, "L1d 48K, L2 2048K, L3 105M");
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = read_sysfs(&dir);
        assert_eq!((missing.caches, missing.levels.as_str()), (Caches::ASSUMED, "cache sizes unknown"));
    }
}
