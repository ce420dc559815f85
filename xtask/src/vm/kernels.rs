//! Debian kernel packages: the newest of a series, downloaded once with
//! `apt-get download` and unpacked with `dpkg -x`; the vmlinuz is kept, and
//! the few netfilter modules the packet scenario needs (Debian builds
//! conntrack, NAT and nf_tables as modules; everything else the tests touch
//! is built in).

use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::{debs, modules};

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Modules for the initramfs, in the order /init loads them.
    pub modules: Vec<PathBuf>,
}

fn kernels_dir() -> PathBuf {
    xtask::toolchain::cache_dir().join("kernels")
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

/// The modules the guests load at boot (with what they depend on): Debian
/// builds netfilter's conntrack, NAT and nf_tables as modules, and the
/// packet scenario writes a real DNAT rule (nf_tables over netlink) and,
/// where netfilter links are missing, reads conntrack's netlink events.
/// `crc32c_generic` first: libcrc32c (which nf_tables and conntrack need)
/// asks the crypto API for crc32c when it loads, a soft dependency that
/// `depends=` does not name; the cloud kernels have it built in (skipped),
/// Debian's generic 6.1 as a module.
const GUEST_MODULES: &[&str] = &[
    "crc32c_generic",
    "nft_chain_nat",
    "nft_nat",
    "nf_conntrack_netlink",
];

/// The newest kernel of a series, fetched into the cache if needed.
pub fn fetch(prefix: &str, suffix: &str) -> Result<Kernel> {
    let package = choose(prefix, suffix)?;
    let dir = kernels_dir().join(&package);
    // A cache made for another module list (or before the guests loaded
    // modules) is fetched again.
    debs::fetch(
        &package,
        &dir,
        |d| {
            d.join("vmlinuz").is_file()
                && d.join(MODULES).join(ORDER).is_file()
                && fs::read_to_string(d.join(MODULES).join(WANTED))
                    .is_ok_and(|w| w == GUEST_MODULES.join(" "))
        },
        |tree, out| harvest(&package, tree, out),
    )?;
    let order = fs::read_to_string(dir.join(MODULES).join(ORDER))?;
    Ok(Kernel {
        package,
        vmlinuz: dir.join("vmlinuz"),
        modules: order
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| dir.join(MODULES).join(l))
            .collect(),
    })
}

const MODULES: &str = "modules";
/// The modules' file names, one a line, in the order to load them.
const ORDER: &str = "order";
/// The GUEST_MODULES the cached modules were chosen for.
const WANTED: &str = "wanted";

/// Keeps the vmlinuz and GUEST_MODULES (decompressed, dependencies first).
fn harvest(package: &str, tree: &Path, out: &Path) -> Result<()> {
    let image = fs::read_dir(tree.join("boot"))
        .with_context(|| format!("{package} has no /boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
    fs::copy(&image, out.join("vmlinuz"))
        .with_context(|| format!("cannot copy {}", image.display()))?;
    let moddir = fs::read_dir(tree.join("lib/modules"))
        .with_context(|| format!("{package} has no /lib/modules"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .with_context(|| format!("{package} has an empty /lib/modules"))?;
    let tree = modules::Tree::read(&moddir)?;
    let order = tree.load_order(GUEST_MODULES)?;
    let mdir = out.join(MODULES);
    fs::create_dir_all(&mdir)?;
    let mut names = String::new();
    for m in &order {
        let file = format!("{m}.ko");
        fs::write(mdir.join(&file), tree.contents(m)?)?;
        names.push_str(&file);
        names.push('\n');
    }
    fs::write(mdir.join(ORDER), names)?;
    fs::write(mdir.join(WANTED), GUEST_MODULES.join(" "))?;
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
