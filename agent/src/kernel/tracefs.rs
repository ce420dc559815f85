//! tracefs, where plain tracepoints are found by name.

use std::path::Path;

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

fn populated(p: &str) -> bool {
    Path::new(p).join("events").is_dir()
}

/// Where tracefs is mounted, if it is.
pub fn mounted() -> Option<&'static str> {
    [TRACEFS, DEBUGFS_TRACING]
        .into_iter()
        .find(|p| populated(p))
}

/// Makes sure tracefs is mounted, mounting it at its standard place (as
/// systemd does on most distributions) when it is not. Plain tracepoints
/// cannot be attached without it; tp_btf and raw_tp can.
pub fn ensure_mounted() -> Result<&'static str, String> {
    if let Some(p) = mounted() {
        return Ok(p);
    }
    let ret = {
        let (src, target, fstype) = (c"nodev", c"/sys/kernel/tracing", c"tracefs");
        // SAFETY: valid NUL-terminated strings; no data argument.
        unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        }
    };
    if ret != 0 || !populated(TRACEFS) {
        return Err(format!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({}): mount it with `mount -t tracefs nodev {TRACEFS}`",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!("mounted tracefs at {TRACEFS} (plain tracepoints need it)");
    Ok(TRACEFS)
}

/// A tracepoint's record layout, from its tracefs `format` file: how plain
/// tracepoint programs find their fields on the running kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointFormat {
    pub name: String,
    pub fields: Vec<Field>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The C declaration, e.g. `__data_loc char[] path`.
    pub decl: String,
    pub offset: u32,
    pub size: u32,
}

impl TracepointFormat {
    pub fn read(category: &str, name: &str) -> Result<TracepointFormat, String> {
        let root = mounted().ok_or("tracefs is not mounted")?;
        let path = format!("{root}/events/{category}/{name}/format");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        TracepointFormat::parse(&text).map_err(|e| format!("{path}: {e}"))
    }

    pub fn parse(text: &str) -> Result<TracepointFormat, String> {
        let mut name = String::new();
        let mut fields = vec![];
        for line in text.lines() {
            let line = line.trim();
            if let Some(n) = line.strip_prefix("name:") {
                name = n.trim().to_string();
            }
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            // "field:int root;\toffset:8;\tsize:4;\tsigned:1;"
            let mut parts = rest.split(';').map(str::trim);
            let decl = parts.next().unwrap_or_default().to_string();
            let mut offset = None;
            let mut size = None;
            for p in parts {
                if let Some(v) = p.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = p.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            let (Some(offset), Some(size)) = (offset, size) else {
                return Err(format!("malformed field line {line:?}"));
            };
            // The name is the last identifier of the declaration ("char comm[16]" → "comm").
            let field_name = decl
                .split_whitespace()
                .last()
                .map(|w| w.split('[').next().unwrap_or(w).to_string())
                .filter(|w| !w.is_empty())
                .ok_or_else(|| format!("field without a name in {line:?}"))?;
            fields.push(Field {
                name: field_name,
                decl,
                offset,
                size,
            });
        }
        if fields.is_empty() {
            return Err("no fields".to_string());
        }
        Ok(TracepointFormat { name, fields })
    }

    pub fn offset(&self, field: &str) -> Result<u32, String> {
        self.fields
            .iter()
            .find(|f| f.name == field)
            .map(|f| f.offset)
            .ok_or_else(|| format!("tracepoint {} has no field {field}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from this project's test machine (6.18).
    const CGROUP_MKDIR: &str = "name: cgroup_mkdir
ID: 544
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int root;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int level;\toffset:12;\tsize:4;\tsigned:1;
\tfield:u64 id;\toffset:16;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] path;\toffset:24;\tsize:4;\tsigned:0;

print fmt: \"root=%d id=%llu level=%d path=%s\", REC->root, REC->id, REC->level, __get_str(path)
";

    #[test]
    fn reads_field_offsets() {
        let f = TracepointFormat::parse(CGROUP_MKDIR).unwrap();
        assert_eq!(f.name, "cgroup_mkdir");
        assert_eq!(f.offset("root").unwrap(), 8);
        assert_eq!(f.offset("id").unwrap(), 16);
        assert_eq!(f.offset("path").unwrap(), 24);
        assert_eq!(f.fields.iter().find(|x| x.name == "path").unwrap().size, 4);
        assert!(f.offset("nope").unwrap_err().contains("no field nope"));
        let exit = "name: sched_process_exit\nformat:\n\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n";
        assert_eq!(
            TracepointFormat::parse(exit)
                .unwrap()
                .offset("comm")
                .unwrap(),
            8
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(TracepointFormat::parse("").is_err());
        assert!(TracepointFormat::parse("field:int x;\toffset:zz;").is_err());
    }
}
