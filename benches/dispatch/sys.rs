//! What the machine and its processes are doing: CPU time from /proc (to tell what
//! limits a figure), peak memory, machine description, and the registry of child
//! processes the watchdog kills.

use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Thread-name prefix of the in-process dispatcher's runtime threads.
pub const DISPATCHER_THREADS: &str = "bench-disp";

/// CLOCK_REALTIME in microseconds.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Remembers a child process so the watchdog can kill it.
pub fn register_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
    }
}

/// SIGKILLs every registered child that is still running (watchdog and fatal paths).
pub fn kill_children() {
    let pids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for pid in pids {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of a /proc stat file after `(comm)`: index 0 is the state (field 3), 1 ppid,
/// 11 utime, 12 stime, 13 cutime, 14 cstime.
fn stat_fields(path: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn ticks(path: &str, with_children: bool) -> u64 {
    stat_fields(path).map_or(0, |f| {
        let own = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        if with_children {
            own + f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0)
        } else {
            own
        }
    })
}

/// CPU ticks of this process's threads whose name starts with `prefix`.
fn own_thread_ticks(prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim().starts_with(prefix))
        })
        .map(|task| ticks(&task.path().join("stat").to_string_lossy(), false))
        .sum()
}

/// The PostgreSQL server's processes: the postmaster and its children.
#[derive(Debug, Clone, Copy)]
pub struct PgProcs {
    /// The postmaster's pid.
    pub postmaster: u32,
}

impl PgProcs {
    /// CPU ticks of the postmaster, its live children and its reaped children.
    fn ticks(&self) -> u64 {
        let mut total = ticks(&format!("/proc/{}/stat", self.postmaster), true);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                let path = format!("/proc/{pid}/stat");
                if let Some(f) = stat_fields(&path)
                    && f.get(1).copied() == Some(u64::from(self.postmaster))
                {
                    total += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
                }
            }
        }
        total
    }
}

/// (busy, steal, total) ticks of all CPUs; busy includes steal.
fn machine_ticks() -> (u64, u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0, 0);
    };
    let Some(line) = text.lines().next() else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let steal = v.get(7).copied().unwrap_or(0);
    (total.saturating_sub(idle), steal, total)
}

/// Which processes a measurement window attributes CPU to.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The receiver process.
    pub receiver: u32,
    /// The PostgreSQL server, when it runs on this machine.
    pub pg: Option<PgProcs>,
    /// `outboxd run` processes, counted as dispatcher.
    pub outboxd: Vec<u32>,
}

/// CPU counters at one instant.
#[derive(Debug, Clone)]
pub struct Snap {
    at: Instant,
    dispatcher_threads: u64,
    process: u64,
    receiver: u64,
    pg: Option<u64>,
    outboxd: u64,
    machine_busy: u64,
    machine_steal: u64,
    machine_total: u64,
}

impl Probe {
    /// Reads every counter now.
    pub fn snap(&self) -> Snap {
        let (machine_busy, machine_steal, machine_total) = machine_ticks();
        Snap {
            at: Instant::now(),
            dispatcher_threads: own_thread_ticks(DISPATCHER_THREADS),
            process: ticks("/proc/self/stat", false),
            receiver: ticks(&format!("/proc/{}/stat", self.receiver), false),
            pg: self.pg.map(|pg| pg.ticks()),
            outboxd: self
                .outboxd
                .iter()
                .map(|pid| ticks(&format!("/proc/{pid}/stat"), false))
                .sum(),
            machine_busy,
            machine_steal,
            machine_total,
        }
    }
}

/// CPU used between two snapshots, in cores (1.0 = one core busy for the whole window).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// Window length.
    pub wall_s: f64,
    /// The dispatcher: in-process runtime threads plus `outboxd run` processes.
    pub dispatcher: f64,
    /// PostgreSQL (all its processes), when measurable.
    pub postgres: Option<f64>,
    /// The receiver process.
    pub receiver: f64,
    /// The rest of the bench process: producers, load generator, bookkeeping.
    pub harness: f64,
    /// Everything on the machine, other users and steal included, in cores.
    pub machine: f64,
    /// Time the hypervisor gave to other guests, in cores.
    pub steal: f64,
}

impl Snap {
    /// Usage from `self` (earlier) to `later`.
    pub fn until(&self, later: &Snap) -> Cpu {
        let wall_s = later.at.duration_since(self.at).as_secs_f64().max(1e-6);
        let cores = |ticks: u64| ticks as f64 / clk_tck() / wall_s;
        let threads = later
            .dispatcher_threads
            .saturating_sub(self.dispatcher_threads);
        let process = later.process.saturating_sub(self.process);
        let total = later.machine_total.saturating_sub(self.machine_total) as f64;
        let busy = later.machine_busy.saturating_sub(self.machine_busy) as f64;
        let steal = later.machine_steal.saturating_sub(self.machine_steal) as f64;
        let ncpu = nproc() as f64;
        Cpu {
            wall_s,
            dispatcher: cores(threads + later.outboxd.saturating_sub(self.outboxd)),
            postgres: match (self.pg, later.pg) {
                (Some(a), Some(b)) => Some(cores(b.saturating_sub(a))),
                _ => None,
            },
            receiver: cores(later.receiver.saturating_sub(self.receiver)),
            harness: cores(process.saturating_sub(threads)),
            machine: if total > 0.0 {
                busy / total * ncpu
            } else {
                0.0
            },
            steal: if total > 0.0 {
                steal / total * ncpu
            } else {
                0.0
            },
        }
    }
}

impl Cpu {
    /// Adds `window` to a running `total` (`None` before the first window).
    pub fn accumulate(total: &mut Option<Cpu>, window: &Cpu) {
        *total = Some(total.map_or(*window, |c| c.combine(window)));
    }

    /// Adds another window's usage, weighting by window length.
    pub fn combine(&self, other: &Cpu) -> Cpu {
        let w = self.wall_s + other.wall_s;
        if w <= 0.0 {
            return *other;
        }
        let mix = |a: f64, b: f64| (a * self.wall_s + b * other.wall_s) / w;
        Cpu {
            wall_s: w,
            dispatcher: mix(self.dispatcher, other.dispatcher),
            postgres: match (self.postgres, other.postgres) {
                (Some(a), Some(b)) => Some(mix(a, b)),
                _ => None,
            },
            receiver: mix(self.receiver, other.receiver),
            harness: mix(self.harness, other.harness),
            machine: mix(self.machine, other.machine),
            steal: mix(self.steal, other.steal),
        }
    }

    /// As JSON, cores rounded to two decimals.
    pub fn json(&self) -> Value {
        let r = |x: f64| (x * 100.0).round() / 100.0;
        json!({
            "window_s": r(self.wall_s),
            "dispatcher_cores": r(self.dispatcher),
            "postgres_cores": self.postgres.map(r),
            "receiver_cores": r(self.receiver),
            "harness_cores": r(self.harness),
            "machine_busy_cores": r(self.machine),
            "steal_cores": r(self.steal),
        })
    }
}

/// A `/proc/<pid>/status` value in KiB, such as `VmHWM`; `pid` None means this process.
pub fn status_kib(pid: Option<u32>, key: &str) -> Option<u64> {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |p| format!("/proc/{p}/status"),
    );
    status_like(&path, key)
}

/// Logical CPUs available.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The machine, for the report.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, m)| m.trim().to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    json!({
        "nproc": nproc(),
        "cpu_model": model,
        "mem_total_kib": status_like("/proc/meminfo", "MemTotal"),
        "kernel": kernel,
        "clk_tck": clk_tck(),
    })
}

fn status_like(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Output of a command's first line, trimmed, if it ran.
pub fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}
