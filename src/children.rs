//! Child processes of the commands that stage a whole scenario (`vmig demo`, `vmig bench`,
//! `vmig soak`): started with their output in log files of a private temporary directory,
//! watched while the parent waits for them, signalled one by one, and stopped, reaped and
//! cleaned up when dropped (the directory kept when asked).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The children, killed and reaped when dropped, and their directory, then removed unless
/// [`Children::keep`] was called.
pub struct Children {
    dir: PathBuf,
    children: Vec<(String, Child)>,
    keep: bool,
}

impl Children {
    /// A fresh directory `vmig-{purpose}-{pid}-{n}` under the system's temporary directory.
    pub fn new(purpose: &str) -> Result<Self, String> {
        static INSTANCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmig-{purpose}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self {
            dir,
            children: Vec::new(),
            keep: false,
        })
    }

    /// Leaves the directory (the logs) in place when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Where the children's sockets and logs go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts this program with `args`, its output going to `{name}.log`: the running
    /// program itself, through `/proc/self/exe`, so that a build that replaced its file since
    /// (a long soak outlives many) changes nothing.
    pub fn spawn(&mut self, name: &str, args: &[String]) -> Result<(), String> {
        let mut command = Command::new("/proc/self/exe");
        command.args(args);
        self.spawn_command(name, command)
    }

    /// Starts `vmig device serve` with a dma-engine speaking migration `protocol` (v1 or v2) on
    /// `socket`, with more of that command's `options` (`--hide-dma`), its output going to
    /// `{name}.log`.
    pub fn spawn_dma_engine(
        &mut self,
        name: &str,
        socket: &Path,
        protocol: &str,
        options: &[&str],
    ) -> Result<(), String> {
        let socket = socket.display().to_string();
        let mut args: Vec<String> = [
            "device",
            "serve",
            "--socket",
            &socket,
            "--device",
            "dma-engine",
            "--migration",
            protocol,
        ]
        .map(String::from)
        .to_vec();
        args.extend(options.iter().map(|o| (*o).to_string()));
        self.spawn(name, &args)
    }

    /// Starts `command`, its output going to `{name}.log`.
    pub fn spawn_command(&mut self, name: &str, mut command: Command) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .map_err(|e| format!("creating a log file: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// An error naming the first child that has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        let exited = self
            .children
            .iter_mut()
            .find_map(|(name, child)| Some((name.clone(), child.try_wait().ok()??)));
        match exited {
            Some((name, status)) => Err(format!("{name} exited early ({status})\n{}", self.logs())),
            None => Ok(()),
        }
    }

    /// Waits up to 30 s for `path` (a socket a child creates), failing early if a child exits.
    pub fn wait_for(&mut self, path: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!("{} did not appear in 30 s", path.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The child called `name`.
    fn child(&mut self, name: &str) -> Option<&mut Child> {
        self.children
            .iter_mut()
            .find_map(|(n, child)| (n == name).then_some(child))
    }

    /// Whether a child called `name` was started.
    pub fn has(&self, name: &str) -> bool {
        self.children.iter().any(|(n, _)| n == name)
    }

    /// Kills child `name` with SIGKILL; false when there is none, or it had exited.
    pub fn kill(&mut self, name: &str) -> bool {
        self.child(name)
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)) && child.kill().is_ok())
    }

    /// Sends SIGTERM to child `name` if it still runs.
    pub fn terminate(&mut self, name: &str) {
        if let Some(child) = self.child(name) {
            terminate(child);
        }
    }

    /// How child `name` exited, if it has (reaping it).
    pub fn exit_status(&mut self, name: &str) -> Option<ExitStatus> {
        self.child(name)?.try_wait().ok()?
    }

    /// Child `name`'s whole log.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The last lines of every child's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            out.push_str(&format!("--- {name} (last lines) ---\n"));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // Let each child finish on its own for a moment (the VMs quit, the servers take SIGTERM).
        for (_, child) in &mut self.children {
            terminate(child);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sends SIGTERM to `child` if it has not exited.
fn terminate(child: &mut Child) {
    // A child already reaped (by `try_wait`) has a pid the system may reuse.
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // Linux pids fit an i32 (pid_max is at most 2^22).
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) takes no pointers; the pid is our unreaped child's, so it cannot name
    // another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}
