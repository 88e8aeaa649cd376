//! Child processes that never outlive the test binary.
//!
//! Two mechanisms, because neither covers every way a test binary ends:
//! - an `atexit` hook stops every child gracefully and removes the scratch directories when
//!   the binary exits normally (all tests done, some of them panicked or not);
//! - `PR_SET_PDEATHSIG` makes the kernel kill a child when the binary dies any other way
//!   (SIGKILL, a timeout, Ctrl-C). The signal fires when the *thread* that forked the child
//!   exits, so children are forked from one thread that lives as long as the process.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, Once, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

/// A running child whose output goes to a log file.
#[derive(Debug)]
pub(crate) struct Process {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) log: PathBuf,
}

impl Process {
    /// The last lines of the process's log, for a failure message.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends `signal` to the process (nothing when it already exited).
    pub(crate) fn signal(&self, signal: i32) {
        if self.is_running()
            && let Ok(pid) = i32::try_from(self.pid)
        {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on a pid this process started and has not reaped.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit; true when it did.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// True while the process runs.
    pub(crate) fn is_running(&self) -> bool {
        let mut children = CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        children
            .iter_mut()
            .find(|c| c.id() == self.pid)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("graft-testenv-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The sender lives in a static, so the loop only ends with the process.
                loop {
                    thread::park();
                }
            })
            .expect("spawning the process-spawner thread");
        register_atexit();
        Mutex::new(tx)
    })
}

/// Starts `command` with its stdout and stderr in `<dir>/<name>.log`.
///
/// # Panics
/// When the process cannot be started.
pub(crate) fn spawn(name: &str, mut command: Command, dir: &Path) -> Process {
    let log = dir.join(format!("{name}.log"));
    let out = File::create(&log).expect("creating a process log");
    let err = out.try_clone().expect("cloning a log handle");
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    die_with_parent(&mut command);
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((command, reply_tx))
        .expect("the spawner thread is alive");
    let child = reply_rx
        .recv()
        .expect("the spawner thread replies")
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let pid = child.id();
    CHILDREN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(child);
    Process {
        name: name.to_owned(),
        pid,
        log,
    }
}

/// A fresh directory under the system temp dir, removed when the test binary exits.
pub(crate) fn scratch_dir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a scratch directory")
        .keep();
    spawner();
    SCRATCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(dir.clone());
    dir
}

#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn register_atexit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: `stop_all` is an `extern "C" fn()` with no arguments, as atexit(3) expects,
        // and never unwinds (it catches nothing that can panic across the boundary: every
        // fallible call in it is matched).
        let rc = unsafe { libc::atexit(stop_all) };
        assert_eq!(rc, 0, "atexit registration failed");
    });
}

extern "C" fn stop_all() {
    let Ok(mut children) = CHILDREN.lock() else {
        return;
    };
    // Stop in reverse start order: controllers before the apiserver, the apiserver before etcd.
    // Children that already exited (killed by a test, restarted since) are skipped: their pid
    // may belong to another process by now.
    for child in children.iter_mut().rev() {
        if !matches!(child.try_wait(), Ok(None)) {
            continue;
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            // A SIGTERM lets etcd and the apiserver close cleanly.
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on a pid this process started and has not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    children.clear();
    if let Ok(dirs) = SCRATCH.lock() {
        for dir in dirs.iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
