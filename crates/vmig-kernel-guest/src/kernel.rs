//! The guest's kernel: the newest Linux 6.12 that bookworm-backports offers (through the
//! private apt configuration, [`Apt::private`]), its modules decompressed for busybox's
//! `insmod` (Debian ships them as `.ko.xz`), and the kernel's `mtty` sample mdev driver
//! (`samples/vfio-mdev/mtty.c`, which Debian does not build: `CONFIG_SAMPLES` is off) built
//! out of tree against the kernel's own headers.
//!
//! What is cached under the work directory, keyed by the kernel's version (so a new version
//! in the lists means one new preparation, and the old version's trees are removed then):
//!
//! ```text
//!  apt/                               private apt: sources.list (bookworm-backports), lists/, cache/
//!  linux-image-VER-amd64-unsigned/    the kernel package, extracted (boot/vmlinuz-*, .ko.xz)
//!  modules-VER-amd64/NAME.ko          the modules the guest loads, decompressed, and mtty.ko
//!  kbuild-VER/                        linux-headers-VER-{amd64,common} + linux-kbuild-VER,
//!                                     extracted together, absolute references rewritten
//!  mtty-VER/                          mtty.c (from linux-source-6.12) and its kbuild output
//!  pahole/                            bookworm's pahole, when the machine has none (BTF)
//! ```
//!
//! The kernel's `.deb`s are deleted once extracted (`linux-source-6.12` alone is 150 MB, for
//! one file); `debs/` keeps busybox's and pahole's.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::PrepareError;
use crate::debian::{
    Apt, BACKPORTS, Timings, apt_failure, download, extract, extract_from_tarball, install, run,
    tool, which,
};

/// The kernel series the guest runs.
pub(crate) const SERIES: &str = "6.12";

/// The kernel packages of [`SERIES`] for amd64 without a signed twin: `apt-cache search
/// --names-only` finds them by this pattern.
const IMAGE_PATTERN: &str = r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$";

/// The module built from the kernel's samples.
pub(crate) const MTTY: &str = "mtty";

/// What the guest boots.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// `uname -r`: `6.12.95+deb12-amd64`.
    pub(crate) release: String,
    /// `vmlinuz-RELEASE`.
    pub(crate) vmlinuz: PathBuf,
    /// The modules asked for and their dependencies, in load order: (name, uncompressed .ko).
    pub(crate) modules: Vec<(String, PathBuf)>,
}

/// Finds, fetches and builds what [`Kernel`] holds; `wanted` are the modules to load (and
/// [`MTTY`], which is built rather than fetched).
pub(crate) fn prepare(
    work: &Path,
    wanted: &[&str],
    timings: &mut Timings,
) -> Result<Kernel, PrepareError> {
    let debs = work.join("debs");
    let apt = Apt::private(&work.join("apt"), BACKPORTS)?;
    apt.ensure_lists(timings)?;
    let abi = match newest_abi(&search_images(&apt)?) {
        Some(abi) => abi,
        None => {
            // Lists from before the suite had the series, or damaged ones.
            apt.update(timings)?;
            newest_abi(&search_images(&apt)?).ok_or_else(|| {
                format!(
                    "bookworm-backports offers no package matching {IMAGE_PATTERN} \
                     (apt-cache search in {})",
                    work.join("apt").display()
                )
            })?
        }
    };

    let image = format!("linux-image-{abi}-amd64-unsigned");
    let image_root = work.join(&image);
    if !image_root.join(".extracted").exists() {
        let deb = download(&apt, &image, &debs, timings)?;
        extract(std::slice::from_ref(&deb), &image_root, timings, |_| Ok(()))?;
        let _ = std::fs::remove_file(&deb);
    }
    let release = single_dir_name(&image_root.join("lib/modules"))
        .ok_or_else(|| format!("{image} has not exactly one lib/modules/RELEASE directory"))?;
    let vmlinuz = image_root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(format!("{image} has no {}", vmlinuz.display()).into());
    }

    let modules_dir = work.join(format!("modules-{release}"));
    std::fs::create_dir_all(&modules_dir).map_err(|e| format!("{}: {e}", modules_dir.display()))?;
    let mtty = modules_dir.join(format!("{MTTY}.ko"));
    if wanted.contains(&MTTY) && !mtty.exists() {
        build_mtty(work, &apt, &abi, &release, &mtty, timings)?;
    }

    // Decompress what is asked for and what it depends on, once.
    let tree = image_root.join("lib/modules").join(&release);
    let mut index: Option<BTreeMap<String, PathBuf>> = None;
    let (mut decompressed, mut decompress_time) = (0, Duration::ZERO);
    let modules = load_order(wanted, |name| {
        let ko = modules_dir.join(format!("{name}.ko"));
        if ko.exists() {
            return Ok(ko);
        }
        let index = index.get_or_insert_with(|| module_index(&tree));
        let source = index.get(name).ok_or_else(|| {
            format!(
                "{image} has no module {name} (expected {name}.ko or {name}.ko.xz, \
                 with - or _, under {})",
                tree.display()
            )
        })?;
        let start = Instant::now();
        decompress(source, &ko)?;
        decompressed += 1;
        decompress_time += start.elapsed();
        Ok(ko)
    })?;
    if decompressed > 0 {
        timings.add(
            format!("decompress {decompressed} modules (xz -dc)"),
            decompress_time,
        );
    }
    if !timings.is_empty() {
        prune(work, &abi, &release);
    }
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// `apt-cache search` for [`IMAGE_PATTERN`] in the private lists.
fn search_images(apt: &Apt) -> Result<String, PrepareError> {
    run(apt
        .command("apt-cache")
        .args(["search", "--names-only", IMAGE_PATTERN]))
    .map_err(apt_failure)
}

/// The newest kernel ABI (`6.12.95+deb12`) among `apt-cache search` lines
/// (`linux-image-6.12.95+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs`), by patch level.
pub(crate) fn newest_abi(search: &str) -> Option<String> {
    search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| {
            p.strip_prefix("linux-image-")?
                .strip_suffix("-amd64-unsigned")
        })
        .filter(|abi| !abi.contains('-'))
        .filter_map(|abi| {
            let (version, debian) = abi.split_once('+')?;
            let patch: u32 = version
                .strip_prefix(SERIES)?
                .strip_prefix('.')?
                .parse()
                .ok()?;
            Some(((patch, debian.to_owned()), abi.to_owned()))
        })
        .max()
        .map(|(_, abi)| abi)
}

/// The packages an out-of-tree build needs besides `headers` itself: what `apt-cache
/// depends headers` names among the other `linux-headers-*` and `linux-kbuild-*` packages.
pub(crate) fn kbuild_packages(headers: &str, depends: &str) -> Vec<String> {
    let mut packages = vec![headers.to_owned()];
    for line in depends.lines() {
        let Some(name) = line
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends: ")
        else {
            continue;
        };
        let name = name.trim();
        if (name.starts_with("linux-headers-") || name.starts_with("linux-kbuild-"))
            && !packages.iter().any(|p| p == name)
        {
            packages.push(name.to_owned());
        }
    }
    packages
}

/// Builds `mtty.ko` for `release` into `out`: the headers and kbuild packages extracted into
/// one tree of their own, `mtty.c` out of `linux-source-6.12`, `make -C HEADERS M=BUILD
/// CC=gcc-12 modules` with a `pahole` on `PATH` (module BTF against the headers' vmlinux).
fn build_mtty(
    work: &Path,
    apt: &Apt,
    abi: &str,
    release: &str,
    out: &Path,
    timings: &mut Timings,
) -> Result<(), PrepareError> {
    let debs = work.join("debs");
    let headers = format!("linux-headers-{release}");
    let root = work.join(format!("kbuild-{abi}"));
    if !root.join(".extracted").exists() {
        let depends =
            run(apt.command("apt-cache").args(["depends", &headers])).map_err(apt_failure)?;
        let packages = kbuild_packages(&headers, &depends);
        let files = packages
            .iter()
            .map(|p| download(apt, p, &debs, timings))
            .collect::<Result<Vec<_>, _>>()?;
        extract(&files, &root, timings, relink_absolute_symlinks)?;
        for deb in &files {
            let _ = std::fs::remove_file(deb);
        }
    }
    let headers_dir = root.join("usr/src").join(&headers);
    point_includes_into(&headers_dir.join("Makefile"), &root)?;
    for link in ["scripts", "tools"] {
        let target = headers_dir.join(link);
        let inside = target
            .canonicalize()
            .is_ok_and(|t| root.canonicalize().is_ok_and(|r| t.starts_with(r)));
        if !inside {
            return Err(format!(
                "{}: expected a directory inside {} (from linux-kbuild)",
                target.display(),
                root.display()
            )
            .into());
        }
    }

    let pahole_bin = pahole(work, timings)?;
    tool("gcc-12", "gcc-12")?;
    tool("make", "make")?;
    tool("xz", "xz-utils")?;

    let build = work.join(format!("mtty-{abi}"));
    if build.to_string_lossy().contains(char::is_whitespace) {
        return Err(format!(
            "{}: kbuild cannot build in a path with whitespace",
            build.display()
        )
        .into());
    }
    let source_c = build.join("mtty.c");
    if !source_c.exists() {
        let source = format!("linux-source-{SERIES}");
        let deb = download(apt, &source, &debs, timings)?;
        let staging = build.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
        let member = format!("{source}/samples/vfio-mdev/mtty.c");
        timings.time(format!("extract {member} from {source}"), || {
            extract_from_tarball(
                &deb,
                &format!("./usr/src/{source}.tar.xz"),
                &member,
                &staging,
            )
        })?;
        std::fs::rename(staging.join("mtty.c"), &source_c)
            .map_err(|e| format!("{source} gave no {member}: {e}"))?;
        let _ = std::fs::remove_dir_all(&staging);
        let _ = std::fs::remove_file(&deb);
    }
    let kbuild = build.join("Kbuild");
    std::fs::write(&kbuild, format!("obj-m := {MTTY}.o\n"))
        .map_err(|e| format!("{}: {e}", kbuild.display()))?;
    let mut path = OsString::new();
    if let Some(bin) = &pahole_bin {
        path.push(bin);
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_default());
    timings.time(format!("build {MTTY}.ko (make M=... modules)"), || {
        run(Command::new("make")
            .arg("-C")
            .arg(&headers_dir)
            .arg(format!("M={}", build.display()))
            .args(["CC=gcc-12", "modules"])
            .env("PATH", path))
    })?;
    let built = build.join(format!("{MTTY}.ko"));
    let bytes = std::fs::read(&built).map_err(|e| format!("{}: {e}", built.display()))?;
    let vermagic = modinfo(&bytes, "vermagic").unwrap_or_default();
    if !vermagic.starts_with(&format!("{release} ")) {
        return Err(format!(
            "{}: vermagic `{vermagic}`, expected one of {release}",
            built.display()
        )
        .into());
    }
    copy_atomically(&built, out)?;
    Ok(())
}

/// A `pahole` for kbuild: the machine's, or bookworm's package extracted under the cache
/// when its libraries are all installed (the directory to put first on `PATH`), or installed
/// when they are not and this process is root.
fn pahole(work: &Path, timings: &mut Timings) -> Result<Option<PathBuf>, PrepareError> {
    if which("pahole").is_some() {
        return Ok(None);
    }
    // Bookworm's `dwarves` is a transitional package: `pahole` holds the program.
    let root = work.join("pahole");
    if !root.join(".extracted").exists() {
        let deb = download(&Apt::System, "pahole", &work.join("debs"), timings)?;
        extract(std::slice::from_ref(&deb), &root, timings, |_| Ok(()))?;
    }
    let bin = root.join("usr/bin");
    let exe = bin.join("pahole");
    if !exe.is_file() {
        return Err(format!("the pahole package has no {}", exe.display()).into());
    }
    let libraries = run(Command::new("ldd").arg(&exe))?;
    let missing: Vec<&str> = libraries
        .lines()
        .filter(|l| l.contains("not found"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if missing.is_empty() {
        return Ok(Some(bin));
    }
    install(
        "pahole",
        &format!(
            "pahole (module BTF for the mtty build) needs {}, which is not installed,",
            missing.join(", ")
        ),
    )?;
    tool("pahole", "pahole")?;
    Ok(None)
}

/// Points `include /usr/src/...` lines of `makefile` at the same files under `root` (the
/// headers' Makefile includes the `-common` tree by absolute path). Idempotent, and right
/// again after the cache moves.
fn point_includes_into(makefile: &Path, root: &Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(makefile).map_err(|e| format!("{}: {e}", makefile.display()))?;
    let mut changed = false;
    let mut out = String::new();
    for line in text.lines() {
        let rewritten = line
            .strip_prefix("include /")
            .and_then(|p| p.rfind("usr/src/").map(|at| &p[at..]))
            .map(|rel| format!("include {}", root.join(rel).display()));
        match rewritten {
            Some(new) if new != line => {
                let target = &new["include ".len()..];
                if !Path::new(target).is_file() {
                    return Err(format!(
                        "{}: `{line}` names a file that is not in {}",
                        makefile.display(),
                        root.display()
                    ));
                }
                changed = true;
                out.push_str(&new);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    if changed {
        std::fs::write(makefile, out).map_err(|e| format!("{}: {e}", makefile.display()))?;
    }
    Ok(())
}

/// Turns every symlink under `root` whose target is absolute (`/usr/src/...`,
/// `/usr/lib/linux-kbuild-...`) into a relative one to the same path under `root`, so the
/// extracted tree refers only to itself.
fn relink_absolute_symlinks(root: &Path) -> Result<(), String> {
    let mut links = Vec::new();
    walk(root, &mut |p| {
        if p.is_symlink() {
            links.push(p.to_owned());
        }
    });
    for link in links {
        let target = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
        if !target.is_absolute() {
            continue;
        }
        let Some(relative) = relative_link(root, &link, &target) else {
            continue;
        };
        std::fs::remove_file(&link).map_err(|e| format!("{}: {e}", link.display()))?;
        std::os::unix::fs::symlink(&relative, &link)
            .map_err(|e| format!("{} -> {}: {e}", link.display(), relative.display()))?;
    }
    Ok(())
}

/// The relative target that makes `link` (under `root`) point at `root` + the absolute
/// `target`.
fn relative_link(root: &Path, link: &Path, target: &Path) -> Option<PathBuf> {
    let depth = link
        .parent()?
        .strip_prefix(root)
        .ok()?
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let mut relative: PathBuf = std::iter::repeat_n("..", depth).collect();
    relative.push(target.strip_prefix("/").ok()?);
    Some(relative)
}

fn walk(dir: &Path, f: &mut impl FnMut(&Path)) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            f(&p);
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, f);
            }
        }
    }
}

/// The name of the one directory in `dir`.
fn single_dir_name(dir: &Path) -> Option<String> {
    let mut names = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok());
    let name = names.next()?;
    names.next().is_none().then_some(name)
}

/// The module name of a file (`vfio-pci.ko.xz` → `vfio_pci`): `.ko` or `.ko.xz` only.
pub(crate) fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko.xz")
        .or_else(|| file.strip_suffix(".ko"))?;
    Some(stem.replace('-', "_"))
}

/// Every module file under `tree`, by module name.
fn module_index(tree: &Path) -> BTreeMap<String, PathBuf> {
    let mut index = BTreeMap::new();
    walk(tree, &mut |p| {
        if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
            index.insert(name, p.to_owned());
        }
    });
    index
}

/// `source` (`.ko.xz`, or a plain `.ko`) uncompressed at `ko`, written under another name
/// first so a half-written module is never taken for a whole one.
fn decompress(source: &Path, ko: &Path) -> Result<(), String> {
    if !source.to_string_lossy().ends_with(".xz") {
        return copy_atomically(source, ko);
    }
    let partial = ko.with_extension("ko.partial");
    let file =
        std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(source)
        .stdin(Stdio::null())
        .stdout(file)
        .status()
        .map_err(|e| format!("xz -dc {}: {e}", source.display()))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(format!("xz -dc {} failed ({status})", source.display()));
    }
    std::fs::rename(&partial, ko).map_err(|e| format!("{}: {e}", ko.display()))
}

fn copy_atomically(from: &Path, to: &Path) -> Result<(), String> {
    let partial = to.with_extension("partial");
    std::fs::copy(from, &partial).map_err(|e| format!("{}: {e}", from.display()))?;
    std::fs::rename(&partial, to).map_err(|e| format!("{}: {e}", to.display()))
}

/// Removes the trees and packages of other kernel versions from `work`.
fn prune(work: &Path, abi: &str, release: &str) {
    let keep = [
        format!("linux-image-{abi}-amd64-unsigned"),
        format!("modules-{release}"),
        format!("kbuild-{abi}"),
        format!("mtty-{abi}"),
    ];
    for entry in std::fs::read_dir(work).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = ["linux-image-", "modules-", "kbuild-", "mtty-"]
            .iter()
            .any(|p| name.starts_with(p));
        if ours && !keep.contains(&name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for entry in std::fs::read_dir(work.join("debs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("linux-") && !name.contains(abi) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The value of `key=` among a module's `.modinfo` strings.
fn modinfo(ko: &[u8], key: &str) -> Option<String> {
    let key = format!("{key}=");
    let key = key.as_bytes();
    // A key starts a string: it follows a NUL (or opens the file).
    let at = ko
        .windows(key.len())
        .enumerate()
        .position(|(i, w)| w == key && (i == 0 || ko[i - 1] == 0))?;
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// The `depends=` list of a kernel module file.
fn module_depends(ko: &[u8]) -> Vec<String> {
    modinfo(ko, "depends")
        .map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// `names` and everything they depend on, dependencies first; `module` gives the
/// uncompressed file of a module by name (`_` for `-`).
pub(crate) fn load_order(
    names: &[&str],
    mut module: impl FnMut(&str) -> Result<PathBuf, String>,
) -> Result<Vec<(String, PathBuf)>, String> {
    fn visit(
        name: &str,
        module: &mut dyn FnMut(&str) -> Result<PathBuf, String>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), String> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 16 {
            return Err(format!("module dependencies loop at {name}"));
        }
        let file = module(name)?;
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        for dep in module_depends(&bytes) {
            visit(&dep, module, order, depth + 1)?;
        }
        order.push((name.to_owned(), file));
        Ok(())
    }
    let mut order = Vec::new();
    for name in names {
        visit(&name.replace('-', "_"), &mut module, &mut order, 0)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_the_modinfo_string() {
        let ko = b"\x7fELF...license=GPL\0depends=vfio-pci-core,vfio\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["vfio_pci_core", "vfio"]);
        assert!(module_depends(b"depends=\0").is_empty());
        let ko = b"\0name=mtty\0vermagic=6.12.95+deb12-amd64 SMP preempt mod_unload\0";
        assert_eq!(
            modinfo(ko, "vermagic").as_deref(),
            Some("6.12.95+deb12-amd64 SMP preempt mod_unload")
        );
        // Only a whole key counts: `srcversion=` is not `version=`.
        assert_eq!(modinfo(b"\0srcversion=AB\0", "version"), None);
    }

    #[test]
    fn the_newest_6_12_kernel_is_picked_by_patch_level() {
        let search = "linux-image-6.12.9+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs\n\
            linux-image-6.12.95+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs\n\
            linux-image-6.12.95+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud\n\
            linux-image-6.12.48+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs\n\
            linux-image-6.1.0-48-amd64-unsigned - Linux 6.1 for 64-bit PCs\n";
        assert_eq!(newest_abi(search).as_deref(), Some("6.12.95+deb12"));
        assert_eq!(newest_abi(""), None);
        assert_eq!(
            newest_abi("linux-image-6.120.1+deb12-amd64-unsigned - x\n"),
            None,
            "6.120 is not 6.12"
        );
    }

    #[test]
    fn the_headers_bring_their_common_tree_and_kbuild() {
        let depends = "linux-headers-6.12.95+deb12-amd64\n  Depends: linux-base\n  \
            Depends: linux-headers-6.12.95+deb12-common\n |Depends: linux-image-6.12.95+deb12-amd64\n  \
            Depends: linux-image-6.12.95+deb12-amd64-unsigned\n  \
            Depends: linux-kbuild-6.12.95+deb12\n  Depends: gcc-12\n";
        assert_eq!(
            kbuild_packages("linux-headers-6.12.95+deb12-amd64", depends),
            [
                "linux-headers-6.12.95+deb12-amd64",
                "linux-headers-6.12.95+deb12-common",
                "linux-kbuild-6.12.95+deb12"
            ]
        );
    }

    #[test]
    fn module_files_are_named_by_their_module() {
        assert_eq!(module_name("vfio-pci.ko.xz").as_deref(), Some("vfio_pci"));
        assert_eq!(module_name("kvm-amd.ko").as_deref(), Some("kvm_amd"));
        assert_eq!(module_name("ccp.ko.zst"), None);
        assert_eq!(module_name("Makefile"), None);
    }

    #[test]
    fn absolute_references_are_rewritten_into_the_tree() {
        let root = std::env::temp_dir().join(format!("vmig-kbuild-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let amd64 = root.join("usr/src/linux-headers-X-amd64");
        let common = root.join("usr/src/linux-headers-X-common");
        let kbuild = root.join("usr/lib/linux-kbuild-X/scripts");
        for d in [&amd64, &common, &kbuild, &root.join("lib/modules/X")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(common.join("Makefile"), "VERSION = 6\n").unwrap();
        let makefile = amd64.join("Makefile");
        std::fs::write(
            &makefile,
            "include /usr/src/linux-headers-X-common/Makefile\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "/usr/src/linux-headers-X-amd64",
            root.join("lib/modules/X/build"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../lib/linux-kbuild-X/scripts", amd64.join("scripts"))
            .unwrap();

        relink_absolute_symlinks(&root).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("lib/modules/X/build")).unwrap(),
            Path::new("../../../usr/src/linux-headers-X-amd64")
        );
        assert!(root.join("lib/modules/X/build/Makefile").is_file());
        // A relative link stays as it was.
        assert_eq!(
            std::fs::read_link(amd64.join("scripts")).unwrap(),
            Path::new("../../lib/linux-kbuild-X/scripts")
        );
        point_includes_into(&makefile, &root).unwrap();
        let expected = format!("include {}\n", common.join("Makefile").display());
        assert_eq!(std::fs::read_to_string(&makefile).unwrap(), expected);
        // Again, and after the tree moved: still the file under the (new) root.
        point_includes_into(&makefile, &root).unwrap();
        assert_eq!(std::fs::read_to_string(&makefile).unwrap(), expected);
        let moved = root.with_extension("moved");
        let _ = std::fs::remove_dir_all(&moved);
        std::fs::rename(&root, &moved).unwrap();
        point_includes_into(
            &moved.join("usr/src/linux-headers-X-amd64/Makefile"),
            &moved,
        )
        .unwrap();
        let text =
            std::fs::read_to_string(moved.join("usr/src/linux-headers-X-amd64/Makefile")).unwrap();
        assert!(
            text.starts_with(&format!("include {}", moved.display())),
            "{text}"
        );
        // An include of something the tree lacks is an error naming it.
        std::fs::write(
            moved.join("usr/src/linux-headers-X-amd64/Makefile"),
            "include /usr/src/linux-headers-Y-common/Makefile\n",
        )
        .unwrap();
        let err = point_includes_into(
            &moved.join("usr/src/linux-headers-X-amd64/Makefile"),
            &moved,
        )
        .unwrap_err();
        assert!(err.contains("linux-headers-Y-common"), "{err}");
        let _ = std::fs::remove_dir_all(&moved);
    }
}
