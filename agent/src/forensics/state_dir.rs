//! The agent's state directory: private (0700, files 0600) and owned by one
//! agent at a time. Two agents appending to one journal would interleave
//! their frames and each would cut the other's "torn" writes at start-up,
//! so the second one refuses to start, naming the first.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Mode of the state directory: node-wide forensics are for root only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in it.
pub const FILE_MODE: u32 = 0o600;
pub const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, Error)]
pub enum StateDirError {
    #[error(
        "the state directory {dir} is in use by another podscope agent (PID {holder}); stop it or give this agent another --state-dir"
    )]
    Busy { dir: PathBuf, holder: String },
    #[error("cannot use the state directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Held for the agent's lifetime; the kernel releases the lock when the
/// process ends, however it ends (no stale lock after a kill -9).
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
}

/// Creates `dir` (0700, also tightening an existing one) and takes its
/// exclusive lock, writing this process's PID into the lock file.
pub fn lock(dir: &Path) -> Result<StateDirLock, StateDirError> {
    let io = |source| StateDirError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    create_private(dir).map_err(io)?;
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    // flock, not fcntl: a POSIX lock would vanish when any other fd of this
    // process on the file closes.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(err));
        }
        return Err(StateDirError::Busy {
            dir: dir.to_path_buf(),
            holder: holder_pid(&mut file),
        });
    }
    private_file(&file).map_err(io)?;
    file.set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|_| file.sync_data())
        .map_err(io)?;
    Ok(StateDirLock { _file: file })
}

/// The holder's PID as it wrote it. The holder writes it right after taking
/// the lock, so a reader racing that write retries briefly.
fn holder_pid(file: &mut File) -> String {
    for _ in 0..20 {
        let mut s = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut s).is_ok() {
            let s = s.trim();
            if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) {
                return s.to_string();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    "unknown".into()
}

/// Creates `dir` and its parents with mode 0700 and sets 0700 on `dir`
/// itself if it existed with a wider mode.
pub fn create_private(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o777 != DIR_MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Sets 0600 on a file created by an older agent with a wider mode.
pub fn private_file(file: &File) -> std::io::Result<()> {
    let meta = file.metadata()?;
    if meta.permissions().mode() & 0o777 != FILE_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_and_lock_file_are_private_and_a_second_lock_names_the_holder() {
        let d = std::env::temp_dir().join(format!("podscope-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let held = lock(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join(LOCK_FILE)), 0o600);
        // flock locks belong to the open file, so a second open in this
        // process conflicts exactly as a second agent would.
        let err = lock(&d).unwrap_err().to_string();
        assert!(
            err.contains(&format!("(PID {})", std::process::id())),
            "{err}"
        );
        drop(held);
        let again = lock(&d);
        assert!(again.is_ok(), "released with its holder");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
