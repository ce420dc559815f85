//! The node-wide API's unix socket: mode 0600 from the moment it exists,
//! in a 0700 directory, owned by the agent's user (root in the DaemonSet).
//! Whoever may connect is whoever may read every pod's events on the node:
//! root there, or `kubectl exec` into the agent's pod.
//!
//! A socket file left by an agent that did not end cleanly (kill -9, a
//! crash) is removed at start-up when nobody listens on it; when someone
//! does, the agent refuses to start and names that process's PID (from the
//! connection's peer credentials). The socket is removed when the agent
//! ends cleanly, if it is still the one this agent made.

use std::{
    fs::DirBuilder,
    io::ErrorKind,
    os::{
        fd::AsRawFd,
        unix::{
            fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Mode of the socket: connecting needs write permission on it.
pub const SOCKET_MODE: u32 = 0o600;
/// Mode of the socket's directory when the agent creates it (or owns it:
/// the default one).
pub const DIR_MODE: u32 = 0o700;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error(
        "the API socket {path} is in use by another process (PID {holder}), most likely another podscope agent; stop it or give this agent another --api-socket"
    )]
    Busy { path: PathBuf, holder: String },
    #[error("{path} exists and is not a socket; remove it or give the agent another --api-socket")]
    NotSocket { path: PathBuf },
    #[error("cannot create the API socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The bound socket. Dropping it removes the file, if it is still this
/// agent's (same device and inode).
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    id: (u64, u64),
}

impl ApiSocket {
    /// Makes the directory (0700 if it creates it; `own_dir` also tightens
    /// an existing one: the default directory is the agent's), replaces a
    /// stale socket, and binds with mode 0600.
    pub fn bind(path: &Path, own_dir: bool) -> Result<ApiSocket, SocketError> {
        let io = |source| SocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("/"));
        if own_dir {
            crate::forensics::state_dir::create_private(dir).map_err(io)?;
        } else if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(io)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(SocketError::NotSocket {
                    path: path.to_path_buf(),
                });
            }
            Ok(_) => match listener_at(path).map_err(io)? {
                Some(holder) => {
                    return Err(SocketError::Busy {
                        path: path.to_path_buf(),
                        holder,
                    });
                }
                // Nobody listens: what a killed agent leaves behind.
                None => {
                    tracing::info!(
                        "removing the stale API socket {} (nothing listens on it)",
                        path.display()
                    );
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(io(e)),
                    }
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let (listener, meta) = bind_private(path, dir).map_err(|e| match e.kind() {
            // Someone bound it between the check above and now.
            ErrorKind::AlreadyExists => SocketError::Busy {
                path: path.to_path_buf(),
                holder: "unknown".into(),
            },
            _ => io(e),
        })?;
        Ok(ApiSocket {
            path: path.to_path_buf(),
            listener: Some(listener),
            id: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener, for the async runtime (once).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        self.listener = None;
        let same_file = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.id && m.file_type().is_socket());
        // An inode number can be reused once the file is gone: a socket
        // another process listens on is never this agent's. (A successor
        // links its socket only once it listens.)
        let someone_elses = UnixStream::connect(&self.path)
            .ok()
            .and_then(|c| peer_pid(&c))
            .is_some_and(|pid| pid != std::process::id() as i32);
        if same_file
            && !someone_elses
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!("cannot remove the API socket {}: {e}", self.path.display());
        }
    }
}

/// Whether a process listens on the socket at `path`: its PID (or
/// "unknown") when one does. A listener that is gone may leave its socket
/// open for a moment in a child it was forking (between fork and exec, the
/// child holds every descriptor): while the PID that listened no longer
/// exists, this waits up to [`ORPHAN_WAIT`] for the socket to close.
fn listener_at(path: &Path) -> std::io::Result<Option<String>> {
    let deadline = std::time::Instant::now() + ORPHAN_WAIT;
    loop {
        let conn = match UnixStream::connect(path) {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let pid = peer_pid(&conn);
        drop(conn);
        // SAFETY: kill(2) with signal 0 only checks that the PID exists.
        let gone = pid.is_some_and(|p| {
            (unsafe { libc::kill(p, 0) }) != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        });
        if !gone || std::time::Instant::now() >= deadline {
            return Ok(Some(
                pid.map_or_else(|| "unknown".into(), |p| p.to_string()),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How long a socket whose listener is gone may stay open (in a child of
/// that listener that has not exec'd yet) before it counts as in use.
const ORPHAN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The length of the directory's path beyond which the socket cannot be
/// bound: [`bind_private`]'s temporary name is `DIR/.psPID/s`.
pub const TEMP_NAME_LEN: usize = "/.ps4194304/s".len();

/// Binds the socket where nobody else can connect (a fresh 0700 directory
/// beside `path`), sets 0600, then links it at `path`, failing if something
/// is there (link(2) never replaces). bind(2) makes the file with the
/// umask's mode, which is process-wide and not changed here; whoever could
/// connect in between is kept out by the private directory.
fn bind_private(path: &Path, dir: &Path) -> std::io::Result<(UnixListener, std::fs::Metadata)> {
    let tmp_dir = dir.join(format!(".ps{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    DirBuilder::new().mode(DIR_MODE).create(&tmp_dir)?;
    let tmp = tmp_dir.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        std::fs::hard_link(&tmp, path)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((listener, meta))
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&tmp_dir);
    result
}

/// The PID of the process listening at the other end (SO_PEERCRED: the
/// listener's credentials when it called listen(2)); None when it is in a
/// PID namespace this process cannot see.
pub fn peer_pid(conn: &UnixStream) -> Option<i32> {
    peer_cred(conn).map(|c| c.pid).filter(|p| *p > 0)
}

/// The peer's credentials (SO_PEERCRED).
pub fn peer_cred(fd: &impl AsRawFd) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("podscope-sock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_socket_is_private_a_stale_one_is_replaced_and_a_live_one_refused() {
        let d = scratch("life");
        let path = d.join("run/api.sock");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        let mut first = ApiSocket::bind(&path, false).unwrap();
        assert_eq!(mode(&path), SOCKET_MODE);
        assert_eq!(
            mode(&d.join("run")),
            DIR_MODE,
            "a directory it creates is 0700"
        );
        // Someone listens: refused, naming the listener (this process).
        let err = ApiSocket::bind(&path, false).unwrap_err().to_string();
        assert!(
            err.contains(&format!("(PID {})", std::process::id())),
            "{err}"
        );
        // A crashed agent's socket: nobody listens any more.
        let listener = first.take_listener().unwrap();
        std::mem::forget(first);
        drop(listener);
        assert!(path.exists());
        let second = ApiSocket::bind(&path, false).unwrap();
        assert_eq!(mode(&path), SOCKET_MODE);
        drop(second);
        assert!(!path.exists(), "removed on a clean end");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let d = scratch("file");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = d.join("api.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = ApiSocket::bind(&path, false).unwrap_err();
        assert!(matches!(err, SocketError::NotSocket { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_file(&path).unwrap();
        // A directory it did not create and does not own keeps its mode.
        let s = ApiSocket::bind(&path, false).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o755);
        drop(s);
        // Its own directory is tightened.
        let s = ApiSocket::bind(&path, true).unwrap();
        assert_eq!(mode(&d), DIR_MODE);
        drop(s);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_successors_socket_is_not_removed() {
        let d = scratch("successor");
        let path = d.join("api.sock");
        let mut a = ApiSocket::bind(&path, false).unwrap();
        drop(a.take_listener());
        // Another agent replaced it meanwhile. (The old file stays linked
        // elsewhere, so that its inode number is not reused: in one process
        // the peer's PID cannot tell the two apart.)
        std::fs::hard_link(&path, d.join("old")).unwrap();
        let b = ApiSocket::bind(&path, false).unwrap();
        drop(a);
        assert!(path.exists(), "the successor's socket stays");
        drop(b);
        assert!(!path.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
