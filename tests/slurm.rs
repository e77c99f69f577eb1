//! `sweep --slurm` against a real Slurm: a single-node cluster (munged, slurmctld, slurmd) started by
//! `tests/slurm/cluster.sh` in a temporary folder on ports of its own. It submits a 4-task array,
//! checks the merged report, requeues a task mid-run and checks that it resumed from its checkpoint,
//! then resubmits the whole array and checks that nothing is trained again. Skipped, with the reason,
//! where Debian's Slurm packages are not installed (`.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PACKAGES: &str = "apt-get install slurmctld slurmd slurm-client munge";

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).chain([PathBuf::from("/usr/sbin")]).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// The running cluster; stopped when dropped (also when the test fails).
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Result<Cluster, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/cluster.sh");
        // Ports of our own, apart from a real cluster's 6817 and from other test processes.
        let port = 20000 + (std::process::id() % 2000) * 2;
        let o = Command::new(&script)
            .args(["start", dir.to_str().unwrap()])
            .env("QAT_SLURM_PORT", port.to_string())
            .env("PATH", path_with_sbin())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let cluster = Cluster { dir: dir.to_path_buf(), conf: dir.join("slurm.conf") };
        if !o.status.success() {
            return Err(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
        }
        Ok(cluster)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf).env("PATH", path_with_sbin()).stdin(Stdio::null());
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let o = self.cmd(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(o.status.success(), "{program} {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// The states of the job's tasks still known to squeue (finished ones drop out).
    fn states(&self, job: &str) -> Vec<String> {
        let out = self.cmd("squeue").args(["-h", "-r", "-j", job, "-o", "%i %T"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    fn wait_done(&self, job: &str, limit: Duration) {
        let start = Instant::now();
        while !self.states(job).is_empty() {
            assert!(start.elapsed() < limit, "job {job} still queued after {limit:?}: {:?}", self.states(job));
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn log(&self) -> String {
        ["slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/cluster.sh");
        let _ = Command::new(script).args(["stop", self.dir.to_str().unwrap()]).status();
    }
}

fn path_with_sbin() -> String {
    format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default())
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Submits the test's array with `qat-lab sweep --slurm --submit`; returns the job id.
fn submit(cluster: &Cluster, out: &Path) -> String {
    let o = cluster
        .cmd(env!("CARGO_BIN_EXE_qat-lab"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "sweep",
            "demo-sweep-digits",
            "--vary",
            "regularizer.kind=none,quantization",
            "--vary",
            "data.noise.rate=0.2,0.4",
            "--set",
            "train.epochs=8",
            "--out",
            out.to_str().unwrap(),
            "--slurm",
            "--submit",
            "--time",
            "00:10:00",
        ])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let id = t.split("submitted job ").nth(1).and_then(|r| r.split(':').next()).expect("a job id");
    id.trim().to_string()
}

#[test]
fn a_sweep_runs_as_a_slurm_array_survives_a_requeue_and_is_not_retrained() {
    let missing: Vec<&str> = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol"]
        .into_iter()
        .filter(|b| !on_path(b))
        .collect();
    if !missing.is_empty() {
        eprintln!("SKIPPED: the Slurm test needs {} (not found); install them with `{PACKAGES}`", missing.join(", "));
        return;
    }
    let tmp = tempfile::Builder::new().prefix("qs").tempdir_in("/tmp").unwrap();
    let cluster = match Cluster::start(&tmp.path().join("cluster")) {
        Ok(c) => c,
        Err(e) => panic!("the single-node Slurm cluster did not start:\n{e}"),
    };
    let out = tmp.path().join("sweep");

    // 1. A 4-task array of tiny runs.
    let started = Instant::now();
    let job = submit(&cluster, &out);
    let submitted = started.elapsed();

    // 3. Requeue task 0 once it has a checkpoint (SIGTERM, as a preemption sends), and let it start
    // again at once (Slurm holds a requeued job for two minutes otherwise).
    let task0 = format!("{job}_0");
    let first_epochs = loop {
        let record = qat_lab::runs::list(&out).into_iter().find(|r| r.id().ends_with("-g0"));
        if let Some(r) = record.filter(|r| r.resumable() || r.finished_ok()) {
            break r.metrics.len();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "task 0 wrote no checkpoint:\n{}", cluster.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(first_epochs < 8, "task 0 finished before it could be requeued (make its runs longer)");
    cluster.run("scontrol", &["requeue", &task0]);
    // The requeue lands once the task has stopped; then its start time can be moved to now.
    let requeued = Instant::now();
    while cluster
        .cmd("scontrol")
        .args(["update", &format!("JobId={task0}"), "StartTime=now"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
        || cluster.states(&task0).iter().any(|s| s.contains("COMPLETING"))
    {
        assert!(requeued.elapsed() < Duration::from_secs(60), "task 0 was not requeued: {:?}", cluster.states(&task0));
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = cluster.cmd("scontrol").args(["update", &format!("JobId={task0}"), "StartTime=now"]).output();
    cluster.wait_done(&job, Duration::from_secs(600));
    let merged = started.elapsed();

    // 2. The merged report holds all 4.
    let records = qat_lab::runs::list(&out);
    assert_eq!(records.len(), 4, "one record per task:\n{}", cluster.log());
    assert!(
        records.iter().all(|r| r.finished_ok()),
        "{:?}",
        records.iter().map(|r| r.summary.clone()).collect::<Vec<_>>()
    );
    let report = Command::new(env!("CARGO_BIN_EXE_qat-lab")).args(["report", out.to_str().unwrap()]).output().unwrap();
    let table = text(&report);
    assert!(
        report.status.success() && table.contains("W4/A4") && table.contains("s=20%") && table.contains("s=40%"),
        "{table}"
    );

    // 3 (cont.). Task 0 resumed in its own folder: every epoch once, and its log says it went on.
    let r0 = records.iter().find(|r| r.id().ends_with("-g0")).unwrap();
    let epochs: Vec<usize> = r0.metrics.iter().map(|m| m.epoch).collect();
    assert_eq!(epochs, (1..=8).collect::<Vec<_>>(), "epochs not repeated");
    let log0 = std::fs::read_to_string(out.join(format!("slurm/{job}_0.out"))).unwrap_or_default();
    assert!(log0.contains("go on from their checkpoints"), "task 0 did not resume:\n{log0}");

    // 4. The whole array again: every task finds its point finished and trains nothing.
    let again = Instant::now();
    let job2 = submit(&cluster, &out);
    cluster.wait_done(&job2, Duration::from_secs(120));
    let resubmitted = again.elapsed();
    assert_eq!(qat_lab::runs::list(&out).len(), 4, "nothing retrained");
    for i in 0..4 {
        let log = std::fs::read_to_string(out.join(format!("slurm/{job2}_{i}.out"))).unwrap_or_default();
        assert!(log.contains("already finished"), "task {i} of the resubmission:\n{log}");
    }
    eprintln!(
        "slurm: submit {:.2}s, 4 tasks (one requeued after {first_epochs} epochs) merged {:.1}s after submitting, resubmission done in {:.1}s",
        submitted.as_secs_f64(),
        merged.as_secs_f64(),
        resubmitted.as_secs_f64()
    );
}
