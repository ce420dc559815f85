//! Debian kernel packages: the newest of a series, downloaded once with
//! `apt-get download` and unpacked with `dpkg -x`; only the vmlinuz is kept
//! (the tests need no modules: everything they touch is built in).

use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use xtask::toolchain::cache_dir;

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub package: String,
    pub vmlinuz: PathBuf,
}

fn kernels_dir() -> PathBuf {
    cache_dir().join("kernels")
}

/// Whether `name` is `prefix` + one version word + `suffix` ("6.1.0-" +
/// "56" + "-cloud-amd64-unsigned"); the version word has no dash, so the
/// generic series never picks up the cloud one.
fn matches(name: &str, prefix: &str, suffix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|r| r.strip_suffix(suffix))
        .is_some_and(|v| !v.is_empty() && !v.contains('-'))
}

/// Compares names with their digit runs as numbers: 6.12.117 > 6.12.99.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = vec![];
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    for (x, y) in chunks(a).into_iter().zip(chunks(b)) {
        let o = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

fn newest(names: impl IntoIterator<Item = String>) -> Option<String> {
    names.into_iter().max_by(|a, b| natural_cmp(a, b))
}

/// The newest package of the series that apt knows, else the newest cached.
fn choose(prefix: &str, suffix: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only"])
        .arg(format!("^{}", prefix.replace('.', "\\.")))
        .output();
    let listed = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| matches(n, prefix, suffix))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if let Some(n) = newest(listed) {
        return Ok(n);
    }
    // Offline, or apt lists not yet fetched: any kernel of the series fetched before.
    let cached = fs::read_dir(kernels_dir())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| matches(n, prefix, suffix) && kernels_dir().join(n).join("vmlinuz").is_file());
    newest(cached).with_context(|| {
        format!("apt knows no package {prefix}*{suffix} and none is cached: run `apt-get update` (Debian's archive must be reachable once)")
    })
}

/// The newest kernel of a series, fetched into the cache if needed.
pub fn fetch(prefix: &str, suffix: &str) -> Result<Kernel> {
    let package = choose(prefix, suffix)?;
    let dir = kernels_dir().join(&package);
    let vmlinuz = dir.join("vmlinuz");
    if !vmlinuz.is_file() {
        download(&package, &dir)?;
    }
    Ok(Kernel { package, vmlinuz })
}

/// Downloads and unpacks a package, keeping its vmlinuz as `dir/vmlinuz`.
fn download(package: &str, dir: &Path) -> Result<()> {
    eprintln!("xtask: fetching {package}");
    let scratch = kernels_dir().join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let r = download_into(package, dir, &scratch);
    let _ = fs::remove_dir_all(&scratch);
    r
}

fn download_into(package: &str, dir: &Path, scratch: &Path) -> Result<()> {
    let out = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(scratch)
        .output()
        .context("cannot run apt-get (is this Debian?)")?;
    if !out.status.success() {
        bail!(
            "`apt-get download {package}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let deb = fs::read_dir(scratch)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("`apt-get download {package}` left no .deb"))?;
    let tree = scratch.join("tree");
    let out = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .output()
        .context("cannot run dpkg")?;
    if !out.status.success() {
        bail!(
            "`dpkg -x {}` failed: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let image = fs::read_dir(tree.join("boot"))
        .with_context(|| format!("{package} has no /boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
    fs::create_dir_all(dir)?;
    // Copy then rename, so an interrupted fetch never leaves a half kernel.
    let part = dir.join("vmlinuz.part");
    fs::copy(&image, &part).with_context(|| format!("cannot copy {}", image.display()))?;
    fs::rename(&part, dir.join("vmlinuz"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_match_exactly() {
        let cloud = ("linux-image-6.1.0-", "-cloud-amd64-unsigned");
        let generic = ("linux-image-6.1.0-", "-amd64-unsigned");
        let n = "linux-image-6.1.0-56-cloud-amd64-unsigned";
        assert!(matches(n, cloud.0, cloud.1));
        assert!(!matches(n, generic.0, generic.1));
        assert!(matches(
            "linux-image-6.1.0-56-amd64-unsigned",
            generic.0,
            generic.1
        ));
        assert!(matches(
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.",
            "-cloud-amd64-unsigned"
        ));
        assert!(!matches(
            "linux-image-6.1.0--cloud-amd64-unsigned",
            cloud.0,
            cloud.1
        ));
    }

    #[test]
    fn the_newest_is_by_number() {
        let names = ["6.12.99+deb12", "6.12.117+deb12", "6.12.107+deb12"];
        assert_eq!(
            newest(names.iter().map(|s| s.to_string())).as_deref(),
            Some("6.12.117+deb12")
        );
        assert_eq!(natural_cmp("6.1.0-9", "6.1.0-10"), Ordering::Less);
    }
}
