//! A kernel package's modules: where each is, what it depends on (the
//! `depends=` of its own .modinfo: Debian's package ships no modules.dep,
//! depmod writes it at install), and its plain ELF contents (busybox's
//! insmod in the guest takes an uncompressed module).

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub struct Tree {
    /// Module name (with `_`, as the kernel spells it) → file.
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

/// `nf-conntrack`, `kernel/net/netfilter/nf_conntrack.ko.xz` → `nf_conntrack`.
fn module_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

impl Tree {
    /// Reads `/lib/modules/<release>` of an unpacked package.
    pub fn read(dir: &Path) -> Result<Tree> {
        let list = |f: &str| -> Result<Vec<String>> {
            let p = dir.join(f);
            Ok(fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect())
        };
        let mut files = HashMap::new();
        for rel in list("modules.order")? {
            // modules.order names the uncompressed file; the package ships it compressed.
            let found = ["", ".xz", ".zst", ".gz"]
                .iter()
                .map(|ext| dir.join(format!("{rel}{ext}")))
                .find(|p| p.is_file());
            if let Some(p) = found {
                files.insert(module_name(&rel), p);
            }
        }
        let builtin = list("modules.builtin")?
            .iter()
            .map(|l| module_name(l))
            .collect();
        Ok(Tree { files, builtin })
    }

    /// The uncompressed module.
    pub fn contents(&self, name: &str) -> Result<Vec<u8>> {
        let path = self
            .files
            .get(name)
            .with_context(|| format!("no module {name}"))?;
        let tool = match path.extension().and_then(|e| e.to_str()) {
            Some("ko") => {
                return fs::read(path).with_context(|| format!("cannot read {}", path.display()));
            }
            Some("xz") => "xz",
            Some("zst") => "zstd",
            Some("gz") => "gzip",
            _ => bail!("{}: not a module file", path.display()),
        };
        let out = Command::new(tool)
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("cannot run {tool} to decompress {}", path.display()))?;
        if !out.status.success() || !out.stdout.starts_with(b"\x7fELF") {
            bail!(
                "`{tool} -dc {}` failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// `depends=` of a module's .modinfo (NUL-separated `key=value` strings).
    fn depends(&self, name: &str) -> Result<Vec<String>> {
        let elf = self.contents(name)?;
        Ok(elf
            .split(|b| *b == 0)
            .find_map(|s| s.strip_prefix(b"depends="))
            .map(|d| {
                String::from_utf8_lossy(d)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(module_name)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `wanted` and everything they need, each after its dependencies;
    /// modules built into the kernel are left out.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>> {
        let mut order = vec![];
        let mut seen = HashSet::new();
        for w in wanted {
            self.visit(&module_name(w), &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if depth > 32 {
            bail!("module dependencies loop at {name}");
        }
        if self.builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        if !self.files.contains_key(name) {
            bail!("this kernel has neither a module nor a built-in {name}");
        }
        for d in self.depends(name)? {
            self.visit(&d, seen, order, depth + 1)?;
        }
        order.push(name.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kernels() {
        assert_eq!(
            module_name("kernel/net/netfilter/nf_conntrack.ko"),
            "nf_conntrack"
        );
        assert_eq!(module_name("kernel/lib/libcrc32c.ko.xz"), "libcrc32c");
        assert_eq!(module_name("nf-nat"), "nf_nat");
    }

    #[test]
    fn dependencies_load_first_and_builtins_are_skipped() {
        let dir = std::env::temp_dir().join(format!("xtask-modules-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("kernel")).unwrap();
        let module = |name: &str, deps: &str| {
            let mut b = b"\x7fELF\0license=GPL\0".to_vec();
            b.extend(format!("depends={deps}\0name={name}\0").as_bytes());
            fs::write(dir.join(format!("kernel/{name}.ko")), b).unwrap();
        };
        module("a", "b,c");
        module("b", "c,builtin_one");
        module("c", "");
        fs::write(
            dir.join("modules.order"),
            "kernel/a.ko\nkernel/b.ko\nkernel/c.ko\n",
        )
        .unwrap();
        fs::write(dir.join("modules.builtin"), "kernel/builtin-one.ko\n").unwrap();
        let t = Tree::read(&dir).unwrap();
        assert_eq!(t.load_order(&["a", "c"]).unwrap(), ["c", "b", "a"]);
        assert!(
            t.load_order(&["missing"])
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
