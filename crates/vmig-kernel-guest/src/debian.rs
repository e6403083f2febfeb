//! Fetching what the guest needs from Debian's packages (`apt-get download`, `dpkg-deb -x`),
//! QEMU and the build tools included, and telling an absent mirror or missing rights
//! ([`PrepareError::Unavailable`]) from a real failure ([`PrepareError::Failed`]).
//!
//! Two apt configurations: the machine's own ([`Apt::System`]: its sources and lists, which
//! only root may update) and a private one under the cache ([`Apt::private`]: a sources file
//! for one suite, bookworm-backports, with lists, cache and state directories of its own, so
//! `apt-get update` needs no root and `/etc/apt` is never touched).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::PrepareError;
use vmig_vfio::sys::is_root;

/// What apt says when it cannot reach its mirror.
const UNREACHABLE: &[&str] = &[
    "Temporary failure resolving",
    "Could not resolve",
    "Failed to fetch",
    "Unable to connect",
    "Could not connect",
    "Connection failed",
    "Connection timed out",
    "Network is unreachable",
    "No route to host",
];

/// The keyring that signs Debian's archive (package `debian-archive-keyring`).
pub(crate) const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The suite the guest's kernel comes from.
pub(crate) const BACKPORTS: &str = "http://deb.debian.org/debian bookworm-backports main";

/// Private package lists older than this are refreshed (when the mirror can be reached).
const LISTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// An apt step's failure: `Unavailable` when the network is out of reach, or when the package
/// lists are missing and only root could fetch them; `Failed` otherwise.
pub(crate) fn apt_failure(why: String) -> PrepareError {
    if UNREACHABLE.iter().any(|m| why.contains(m)) {
        PrepareError::Unavailable(format!("Debian's mirror cannot be reached: {why}"))
    } else if !is_root()
        && (why.contains("Unable to locate package") || why.contains("No packages found"))
    {
        PrepareError::Unavailable(format!(
            "apt has no package lists and updating them needs root: {why}"
        ))
    } else {
        PrepareError::Failed(why)
    }
}

/// Runs the machine's `apt-get update`; only a failure to reach the mirror is worth
/// reporting, as the step that needed the lists says what it missed.
pub(crate) fn apt_update() -> Result<(), PrepareError> {
    if !is_root() {
        return Ok(());
    }
    match run(Command::new("apt-get").args(["update", "-qq"])) {
        Err(why) if UNREACHABLE.iter().any(|m| why.contains(m)) => Err(apt_failure(why)),
        _ => Ok(()),
    }
}

/// Where apt gets packages from.
#[derive(Debug, Clone)]
pub(crate) enum Apt {
    /// The machine's own sources and lists (updating them needs root).
    System,
    /// A sources file, package lists, cache and state of our own under `dir`
    /// (`apt-get -o Dir::Etc::SourceList=... -o Dir::State=... -o Dir::Cache=...`).
    Private {
        /// `sources.list`, `lists/`, `cache/`.
        dir: PathBuf,
        /// What the lists are of, for messages (`bookworm-backports`).
        suite: String,
    },
}

impl Apt {
    /// A private configuration under `dir` for the one-line source `source` (`URI SUITE
    /// COMPONENT`), signed by Debian's archive keyring; makes its directories and writes its
    /// sources file.
    pub(crate) fn private(dir: &Path, source: &str) -> Result<Self, PrepareError> {
        if !Path::new(DEBIAN_KEYRING).is_file() {
            return Err(PrepareError::Unavailable(format!(
                "{DEBIAN_KEYRING} is missing: verifying Debian's archive needs it (apt-get \
                 install debian-archive-keyring)"
            )));
        }
        for sub in ["lists/partial", "cache/archives/partial"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        // An empty dpkg status: to this configuration nothing is installed, so what it
        // resolves does not lean on the machine's own (older) packages.
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, b"").map_err(|e| format!("{}: {e}", status.display()))?;
        }
        let list = dir.join("sources.list");
        let line = format!("deb [signed-by={DEBIAN_KEYRING}] {source}\n");
        if std::fs::read_to_string(&list).ok().as_deref() != Some(&line) {
            std::fs::write(&list, &line).map_err(|e| format!("{}: {e}", list.display()))?;
        }
        let suite = source
            .split_whitespace()
            .nth(1)
            .unwrap_or(source)
            .to_owned();
        Ok(Self::Private {
            dir: dir.to_owned(),
            suite,
        })
    }

    /// `program` (`apt-get`, `apt-cache`) with this configuration's options.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if let Self::Private { dir, .. } = self {
            let option = |key: &str, path: PathBuf| {
                let mut o = OsString::from(format!("{key}="));
                o.push(path);
                ["-o".into(), o]
            };
            cmd.args(option("Dir::Etc::SourceList", dir.join("sources.list")))
                .args(option("Dir::Etc::SourceParts", PathBuf::from("/dev/null")))
                .args(option("Dir::State", dir.clone()))
                .args(option("Dir::State::status", dir.join("status")))
                .args(option("Dir::Cache", dir.join("cache")));
        }
        cmd
    }

    /// Fetches the package lists. The machine's: only as root, and only an unreachable
    /// mirror is reported. A private configuration's: any failure is reported (unreachable:
    /// `Unavailable`; anything else, such as a bad signature: `Failed`).
    pub(crate) fn update(&self, timings: &mut Timings) -> Result<(), PrepareError> {
        let Self::Private { suite, .. } = self else {
            return apt_update();
        };
        let start = Instant::now();
        // apt-get update exits 0 when it could not fetch a list, unless told otherwise.
        run(self
            .command("apt-get")
            .args(["-qq", "-o", "APT::Update::Error-Mode=any", "update"]))
        .map_err(|why| {
            if UNREACHABLE.iter().any(|m| why.contains(m)) {
                PrepareError::Unavailable(format!("Debian's mirror cannot be reached: {why}"))
            } else {
                PrepareError::Failed(why)
            }
        })?;
        timings.add(format!("apt-get update ({suite})"), start.elapsed());
        Ok(())
    }

    /// Makes sure a private configuration has package lists: fetched when there are none,
    /// refreshed when they are older than a week (keeping the old ones when the mirror cannot
    /// be reached then).
    pub(crate) fn ensure_lists(&self, timings: &mut Timings) -> Result<(), PrepareError> {
        let Self::Private { dir, .. } = self else {
            return Ok(());
        };
        let newest = std::fs::read_dir(dir.join("lists"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        match newest {
            None => self.update(timings),
            Some(t) if SystemTime::now().duration_since(t).unwrap_or_default() > LISTS_MAX_AGE => {
                match self.update(timings) {
                    Err(PrepareError::Unavailable(_)) => Ok(()),
                    other => other,
                }
            }
            Some(_) => Ok(()),
        }
    }
}

/// Downloads `package` and what it depends on (not what it recommends), with `apt` as if
/// nothing were installed, into `apt`'s cache unless they are there; returns the `.deb`s.
pub(crate) fn download_closure(
    apt: &Apt,
    package: &str,
    timings: &mut Timings,
) -> Result<Vec<PathBuf>, PrepareError> {
    let Apt::Private { dir, suite } = apt else {
        return Err(PrepareError::Failed(format!(
            "the packages {package} needs are fetched with a private apt configuration only"
        )));
    };
    let start = Instant::now();
    let fetch = || {
        run(apt
            .command("apt-get")
            .args(["-qq", "-y", "--no-install-recommends", "--download-only"])
            .args(["install", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    fetch_with_fresh_lists(apt, timings, fetch)?;
    let archives = dir.join("cache/archives");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&archives)
        .map_err(|e| format!("{}: {e}", archives.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    if debs.is_empty() {
        return Err(format!(
            "apt-get left no .deb of {package} in {}",
            archives.display()
        )
        .into());
    }
    let bytes: u64 = debs
        .iter()
        .filter_map(|d| std::fs::metadata(d).ok())
        .map(|m| m.len())
        .sum();
    timings.add(
        format!(
            "download {package} and {} packages it needs from {suite} ({})",
            debs.len() - 1,
            megabytes(bytes)
        ),
        start.elapsed(),
    );
    Ok(debs)
}

/// QEMU's `qemu-system-x86_64`, installed from Debian's `qemu-system-x86` when it is missing
/// and this process is root (`Unavailable` when it cannot be had).
pub fn qemu_system() -> Result<PathBuf, PrepareError> {
    tool("qemu-system-x86_64", "qemu-system-x86")
}

/// `program` on `PATH`, installed from `package` when it is missing and this process is root
/// (`Unavailable` when it cannot be had).
pub(crate) fn tool(program: &str, package: &str) -> Result<PathBuf, PrepareError> {
    if let Some(path) = which(program) {
        return Ok(path);
    }
    install(package, &format!("{program} is missing"))?;
    Ok(which(program).ok_or_else(|| format!("{package} installed no {program}"))?)
}

/// Installs `package` with the machine's apt (`missing` says why it is needed); only root can.
pub(crate) fn install(package: &str, missing: &str) -> Result<(), PrepareError> {
    if which("apt-get").is_none() || !is_root() {
        return Err(PrepareError::Unavailable(format!(
            "{missing} and installing it needs apt-get and root (apt-get install {package})"
        )));
    }
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        apt_update()?;
        install().map_err(apt_failure)?;
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// The `.deb` of `package` in `dir`, if one is there.
fn find_deb(package: &str, dir: &Path) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// Runs `fetch` (an apt download); when it fails, fetches `apt`'s package lists and runs it
/// once more.
fn fetch_with_fresh_lists(
    apt: &Apt,
    timings: &mut Timings,
    fetch: impl Fn() -> Result<String, String>,
) -> Result<String, PrepareError> {
    match fetch() {
        Ok(out) => Ok(out),
        Err(_) => {
            apt.update(timings)?;
            fetch().map_err(apt_failure)
        }
    }
}

/// Downloads `package` (a `.deb`) with `apt` into `dir` unless it is there; returns its path.
pub(crate) fn download(
    apt: &Apt,
    package: &str,
    dir: &Path,
    timings: &mut Timings,
) -> Result<PathBuf, PrepareError> {
    if let Some(deb) = find_deb(package, dir) {
        return Ok(deb);
    }
    let start = Instant::now();
    let fetch = || {
        run(apt
            .command("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(dir))
    };
    // The package lists may be missing on a fresh machine, or name a version the mirror no
    // longer has.
    fetch_with_fresh_lists(apt, timings, fetch)?;
    let deb = find_deb(package, dir).ok_or_else(|| {
        PrepareError::Failed(format!(
            "apt-get download {package} left no .deb in {}",
            dir.display()
        ))
    })?;
    let bytes = std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
    timings.add(
        format!("download {package} ({})", megabytes(bytes)),
        start.elapsed(),
    );
    Ok(deb)
}

/// Extracts `debs` into `dir` once (all of them, then `fixup`, then the mark that it is done).
pub(crate) fn extract(
    debs: &[PathBuf],
    dir: &Path,
    timings: &mut Timings,
    fixup: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let done = dir.join(".extracted");
    if done.exists() {
        return Ok(());
    }
    let start = Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for deb in debs {
        if let Err(e) = run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir)) {
            // A damaged download must not be reused by the next attempt.
            let _ = std::fs::remove_file(deb);
            return Err(e);
        }
    }
    fixup(dir)?;
    std::fs::write(&done, b"").map_err(|e| format!("{}: {e}", done.display()))?;
    let names: Vec<&str> = debs
        .iter()
        .filter_map(|d| d.file_name()?.to_str()?.split('_').next())
        .collect();
    let what = match names.as_slice() {
        [one] => (*one).to_owned(),
        few @ [_, _, ..] if few.len() <= 6 => {
            format!("{} packages ({})", few.len(), few.join(", "))
        }
        many => format!(
            "{} packages ({}, and {} more)",
            many.len(),
            many[..4].join(", "),
            many.len() - 4
        ),
    };
    timings.add(format!("extract {what}"), start.elapsed());
    Ok(())
}

/// Extracts the file `member` of the tarball `tarball` inside `deb` (a source package's
/// `.tar.xz`) into `dir`, without its leading directories, streaming: nothing else of the
/// tarball is written.
pub(crate) fn extract_from_tarball(
    deb: &Path,
    tarball: &str,
    member: &str,
    dir: &Path,
) -> Result<(), String> {
    let spawn = |cmd: &mut Command| cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"));
    let mut fsys = spawn(
        Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(deb)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let fsys_out = fsys.stdout.take().ok_or("dpkg-deb gave no stdout")?;
    let mut outer = spawn(
        Command::new("tar")
            .args(["-xO", tarball])
            .stdin(fsys_out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let outer_out = outer.stdout.take().ok_or("tar gave no stdout")?;
    let strip = member.matches('/').count();
    let inner = Command::new("tar")
        .arg("-xJ")
        .arg(format!("--strip-components={strip}"))
        .arg("-C")
        .arg(dir)
        .arg(member)
        .stdin(outer_out)
        .output()
        .map_err(|e| format!("tar -xJ: {e}"))?;
    let outer = outer.wait_with_output().map_err(|e| e.to_string())?;
    let fsys = fsys.wait_with_output().map_err(|e| e.to_string())?;
    for (what, status, stderr) in [
        (
            format!("dpkg-deb --fsys-tarfile {}", deb.display()),
            fsys.status,
            fsys.stderr,
        ),
        (format!("tar -xO {tarball}"), outer.status, outer.stderr),
        (format!("tar -xJ {member}"), inner.status, inner.stderr),
    ] {
        if !status.success() {
            return Err(format!(
                "{what} failed ({status}): {}",
                String::from_utf8_lossy(&stderr).trim()
            ));
        }
    }
    Ok(())
}

/// `bytes` in MB with one decimal.
fn megabytes(bytes: u64) -> String {
    format!("{}.{} MB", bytes / 1_000_000, bytes / 100_000 % 10)
}

/// How long each step of a preparation that did work took (a cached preparation has none).
#[derive(Debug, Default)]
pub(crate) struct Timings {
    steps: Vec<(String, Duration)>,
}

impl Timings {
    pub(crate) fn add(&mut self, step: String, took: Duration) {
        self.steps.push((step, took));
    }

    /// Runs `f` as step `step`.
    pub(crate) fn time<T>(&mut self, step: impl Into<String>, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(step.into(), start.elapsed());
        out
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The steps, one a line, after a headline with their sum.
    pub(crate) fn render(&self, headline: &str) -> String {
        let total: Duration = self.steps.iter().map(|(_, d)| *d).sum();
        let mut out = format!("{headline}: {:.1} s of work\n", total.as_secs_f64());
        for (step, took) in &self.steps {
            out.push_str(&format!("  {:>6.2} s  {step}\n", took.as_secs_f64()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unreachable_mirror_or_missing_rights_make_the_guest_unavailable() {
        let offline = "\"apt-get\" \"download\" \"busybox-static\" failed (exit status: 100): \
            E: Failed to fetch http://deb.example/busybox-static.deb  Temporary failure resolving";
        assert!(matches!(
            apt_failure(offline.into()),
            PrepareError::Unavailable(why) if why.starts_with("Debian's mirror cannot be reached")
        ));
        let damaged = "\"dpkg-deb\" \"-x\" failed (exit status: 2): dpkg-deb: error: \
            archive has premature member 'control.tar.xz'";
        assert_eq!(
            apt_failure(damaged.into()),
            PrepareError::Failed(damaged.into())
        );
        let unknown = "E: Unable to locate package linux-image-9.9.9-amd64";
        let as_root = matches!(apt_failure(unknown.into()), PrepareError::Failed(_));
        assert_eq!(as_root, is_root(), "only root could have fetched the lists");
    }

    #[test]
    fn a_private_configuration_keeps_apt_out_of_etc() {
        let dir = std::env::temp_dir().join(format!("vmig-apt-test-{}", std::process::id()));
        let apt = match Apt::private(&dir, BACKPORTS) {
            Ok(apt) => apt,
            // A machine without Debian's keyring cannot have the private configuration.
            Err(PrepareError::Unavailable(why)) => {
                assert!(why.contains(DEBIAN_KEYRING), "{why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let list = std::fs::read_to_string(dir.join("sources.list")).unwrap();
        assert_eq!(
            list,
            format!("deb [signed-by={DEBIAN_KEYRING}] {BACKPORTS}\n")
        );
        assert!(dir.join("lists/partial").is_dir() && dir.join("cache/archives/partial").is_dir());
        assert_eq!(std::fs::read(dir.join("status")).unwrap(), b"");
        let cmd = apt.command("apt-cache");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let expected = [
            format!(
                "Dir::Etc::SourceList={}",
                dir.join("sources.list").display()
            ),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State={}", dir.display()),
            format!("Dir::State::status={}", dir.join("status").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
        ];
        for e in &expected {
            let at = args
                .iter()
                .position(|a| a == e)
                .unwrap_or_else(|| panic!("{e} missing: {args:?}"));
            assert_eq!(args[at - 1], "-o");
        }
        assert!(matches!(&apt, Apt::Private { suite, .. } if suite == "bookworm-backports"));
        assert!(Apt::System.command("apt-get").get_args().next().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn timings_render_one_step_a_line_under_their_sum() {
        let mut t = Timings::default();
        assert!(t.is_empty());
        t.add("download a".into(), Duration::from_millis(1500));
        t.time("build", || ());
        let text = t.render("rig");
        assert!(text.starts_with("rig: 1.5 s of work\n"), "{text}");
        assert!(text.contains("\n    1.50 s  download a\n"), "{text}");
        assert_eq!(text.lines().count(), 3);
        assert_eq!(megabytes(106_423_764), "106.4 MB");
    }
}
