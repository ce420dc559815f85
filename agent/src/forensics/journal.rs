//! The termination journal: records survive agent restarts and crashes.
//!
//! An append-only file of frames `magic | length | crc32 | JSON`, written
//! with one write(2) each and fdatasync'd, in two generations
//! (`terminations.journal` and `.1`) so its size stays under a bound: when
//! the current file reaches half the bound it becomes `.1` (dropping the
//! older one) and a new one starts.
//!
//! Crash safety: a frame is valid only if its length and checksum match,
//! so an agent killed in the middle of a write leaves at most one torn frame
//! at the end, which opening cuts off (counted and logged, never fatal).
//! Corruption in the middle (a bad sector, a stray write) costs only the
//! damaged bytes: reading resynchronizes at the next valid frame and keeps
//! every record after it (the skipped bytes are counted).
//!
//! Nothing is lost silently when the disk fails: a record that cannot be
//! written (disk full, I/O error) waits in memory, bounded and counted, and
//! is written, in order, as soon as a write succeeds again; a rotation that
//! fails is retried at the next record while the current file may still
//! grow up to the whole bound.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::{
    record::TerminationRecord,
    state_dir::{FILE_MODE, create_private, private_file},
};

const MAGIC: u32 = 0x314a_5350; // "PSJ1", little-endian
const HEADER: usize = 12;
/// A record is a few kB; anything larger is corruption, not data.
const MAX_FRAME: usize = 1 << 20;
/// Records waiting in memory for the disk; beyond this the oldest is
/// dropped from the queue (counted; it stays in the API's memory).
pub const MAX_PENDING: usize = 10_000;
pub const FILE_NAME: &str = "terminations.journal";

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("cannot use the state directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What opening found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub records: usize,
    /// Bytes cut off after the last valid frame (a torn write).
    pub dropped_bytes: u64,
    /// Bytes of corrupt frames skipped between valid ones.
    pub skipped_bytes: u64,
}

/// The journal's running counts, read by the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub written: u64,
    /// Failed write attempts (each pending record is retried).
    pub write_errors: u64,
    /// Failed rotations (each retried at the next record).
    pub rotation_errors: u64,
    /// Records dropped from the full memory queue without reaching the disk.
    pub lost: u64,
}

pub struct Journal {
    dir: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    /// Encoded frames not yet on disk, oldest first.
    pending: VecDeque<Vec<u8>>,
    pub counts: Counts,
    pub recovery: Recovery,
    /// Fault injection for the crash test, compiled into test builds only
    /// (feature `fault-injection`): write each frame in two halves this many
    /// ms apart (`PODSCOPE_JOURNAL_SPLIT_WRITE_MS`).
    #[cfg(feature = "fault-injection")]
    split_write_ms: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and returns every record it
    /// holds, oldest first.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(Journal, Vec<TerminationRecord>, Recovery), JournalError> {
        create_private(dir).map_err(|source| JournalError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let current = dir.join(FILE_NAME);
        let previous = dir.join(format!("{FILE_NAME}.1"));
        let mut records = vec![];
        let mut recovery = Recovery::default();
        if let Ok(data) = std::fs::read(&previous) {
            let p = parse(&data);
            records.extend(p.records);
            recovery.skipped_bytes += p.skipped;
            recovery.dropped_bytes += (data.len() - p.end) as u64;
            if let Ok(f) = File::open(&previous) {
                let _ = private_file(&f);
            }
        }
        let data = match std::fs::read(&current) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(source) => {
                return Err(JournalError::Io {
                    what: "read",
                    path: current,
                    source,
                });
            }
        };
        let p = parse(&data);
        let good = p.end;
        records.extend(p.records);
        recovery.skipped_bytes += p.skipped;
        recovery.dropped_bytes += (data.len() - good) as u64;
        recovery.records = records.len();
        let io = |what, source| JournalError::Io {
            what,
            path: current.clone(),
            source,
        };
        let file = open_file(&current, false).map_err(|e| io("open", e))?;
        private_file(&file).map_err(|e| io("chmod", e))?;
        if p.skipped > 0 {
            tracing::warn!(
                "the termination journal in {} had {} corrupt bytes between valid records; they were skipped, every valid record is kept",
                dir.display(),
                recovery.skipped_bytes
            );
        }
        if good < data.len() {
            tracing::warn!(
                "the termination journal {} ended in {} bytes of a torn write (the agent was killed while writing); they were cut off, every earlier record is kept",
                current.display(),
                data.len() - good
            );
            file.set_len(good as u64).map_err(|e| io("truncate", e))?;
            file.sync_data().map_err(|e| io("sync", e))?;
        }
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                file,
                size: good as u64,
                max_bytes: max_bytes.max(64 << 10),
                pending: VecDeque::new(),
                counts: Counts::default(),
                recovery: recovery.clone(),
                #[cfg(feature = "fault-injection")]
                split_write_ms: std::env::var("PODSCOPE_JOURNAL_SPLIT_WRITE_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            },
            records,
            recovery,
        ))
    }

    /// Appends one record durably, after any still waiting. An error means
    /// the record waits in memory (see [`Journal::pending`]) for the next
    /// successful write; it is returned for logging.
    pub fn append(&mut self, record: &TerminationRecord) -> Result<(), JournalError> {
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
            self.counts.lost += 1;
        }
        self.pending.push_back(frame(record));
        self.flush()
    }

    /// Writes the records waiting in memory, oldest first, stopping at the
    /// first failure.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        while let Some(frame) = self.pending.front() {
            let len = frame.len() as u64;
            if self.size + len > self.max_bytes / 2
                && let Err(e) = self.rotate()
            {
                self.counts.rotation_errors += 1;
                // The current file may take the whole bound while rotation
                // is retried; past it the record waits in memory.
                if self.size + len > self.max_bytes {
                    return Err(e);
                }
                if self.counts.rotation_errors == 1 {
                    tracing::warn!("{e}: retried at the next record");
                }
            }
            self.write_front()?;
            self.pending.pop_front();
            self.size += len;
            self.counts.written += 1;
        }
        Ok(())
    }

    fn write_front(&mut self) -> Result<(), JournalError> {
        let path = self.dir.join(FILE_NAME);
        let io = |what, source| JournalError::Io {
            what,
            path: path.clone(),
            source,
        };
        let Some(frame) = self.pending.front() else {
            return Ok(());
        };
        let split_ms = self.split_ms();
        let file = &mut self.file;
        // O_APPEND is not used: after a cut the offset is the file's end anyway.
        let result = file
            .seek(SeekFrom::Start(self.size))
            .and_then(|_| write_frame(file, frame, split_ms))
            .and_then(|_| file.sync_data());
        if let Err(e) = result {
            self.counts.write_errors += 1;
            // Cut whatever part reached the file (on a full disk this frees
            // the space again); a part left behind is cut at the next open.
            let _ = self.file.set_len(self.size);
            return Err(io("write to", e));
        }
        Ok(())
    }

    #[cfg(feature = "fault-injection")]
    fn split_ms(&self) -> u64 {
        self.split_write_ms
    }

    #[cfg(not(feature = "fault-injection"))]
    fn split_ms(&self) -> u64 {
        0
    }

    /// `.1` is replaced by the current file and a new current one starts.
    /// Each step can be retried: a rename already done (current missing) is
    /// not redone.
    fn rotate(&mut self) -> Result<(), JournalError> {
        let current = self.dir.join(FILE_NAME);
        let previous = self.dir.join(format!("{FILE_NAME}.1"));
        let io = |what, source| JournalError::Io {
            what,
            path: current.clone(),
            source,
        };
        match std::fs::rename(&current, &previous) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("rotate", e)),
        }
        self.file = open_file(&current, true).map_err(|e| io("create", e))?;
        // The rename must reach the disk before records land in the new file.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.size = 0;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Records waiting in memory for the disk.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn open_file(path: &Path, truncate: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(truncate)
        .mode(FILE_MODE)
        .open(path)
}

/// One write(2) for the frame; in fault-injection builds optionally two,
/// `split_ms` apart, so that a test can kill the agent in between.
fn write_frame(file: &mut File, frame: &[u8], split_ms: u64) -> std::io::Result<()> {
    if split_ms == 0 {
        return file.write_all(frame);
    }
    let (a, b) = frame.split_at(frame.len() / 2);
    file.write_all(a)?;
    let _ = file.sync_data();
    std::thread::sleep(std::time::Duration::from_millis(split_ms));
    file.write_all(b)
}

fn frame(record: &TerminationRecord) -> Vec<u8> {
    // Serializing plain data cannot fail.
    let body = serde_json::to_vec(record).unwrap_or_default();
    let mut f = Vec::with_capacity(HEADER + body.len());
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    f.extend_from_slice(&body);
    f
}

/// What reading a journal file found.
#[derive(Debug, Default)]
pub struct Parsed {
    pub records: Vec<TerminationRecord>,
    /// Where the last valid frame ends: what follows is a torn write.
    pub end: usize,
    /// Bytes between valid frames that were skipped as corrupt.
    pub skipped: u64,
}

/// The body of the valid frame starting at `at`, if one does.
fn frame_at(data: &[u8], at: usize) -> Option<&[u8]> {
    let header = data.get(at..at.checked_add(HEADER)?)?;
    let word = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[i..i + 4]);
        u32::from_le_bytes(b)
    };
    let (magic, len, crc) = (word(0), word(4) as usize, word(8));
    if magic != MAGIC || len > MAX_FRAME {
        return None;
    }
    let body = data.get(at + HEADER..(at + HEADER).checked_add(len)?)?;
    (crc32fast::hash(body) == crc).then_some(body)
}

/// Every valid frame, resynchronizing after corrupt bytes at the next
/// position where a valid frame starts.
pub fn parse(data: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    let magic = MAGIC.to_le_bytes();
    let mut at = 0;
    while at < data.len() {
        let Some(body) = frame_at(data, at) else {
            // Only positions holding the magic can start a frame.
            at = match data[at + 1..].windows(4).position(|w| w == magic) {
                Some(i) => at + 1 + i,
                None => data.len(),
            };
            continue;
        };
        match serde_json::from_slice(body) {
            Ok(r) => out.records.push(r),
            // A valid frame from a newer podscope with fields this one does
            // not know is skipped, not a reason to stop.
            Err(e) => tracing::debug!("skipping a journal record this version cannot read: {e}"),
        }
        out.skipped += (at - out.end) as u64;
        at += HEADER + body.len();
        out.end = at;
    }
    out
}

/// Reads the records of a journal directory without opening it for writing.
pub fn read_dir(dir: &Path) -> Vec<TerminationRecord> {
    let mut out = vec![];
    for name in [format!("{FILE_NAME}.1"), FILE_NAME.to_string()] {
        let mut data = vec![];
        if let Ok(mut f) = File::open(dir.join(name)) {
            let _ = f.read_to_end(&mut data);
            out.extend(parse(&data).records);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::forensics::record::{Reason, StopTimeline};

    pub fn record(n: u32) -> TerminationRecord {
        TerminationRecord {
            pod: crate::metadata::PodIdentity {
                namespace: Some("ns".into()),
                pod: Some(format!("pod-{n}").into()),
                pod_uid: Some("uid".into()),
                container: Some("app".into()),
                container_id: Some(format!("{n:064x}").into()),
            },
            restart_attempt: Some(0),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            finished_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_100),
            pid: n,
            comm: "app".into(),
            exit_code: 3,
            signal: None,
            core_dumped: false,
            reason: Reason::Error,
            explanation: "PID 1 (app) exited with code 3".into(),
            sender: None,
            stop: StopTimeline::default(),
            oom: None,
            previous_deaths: vec![],
            container_type: None,
            respawns: vec![],
            trigger: None,
            pre_stop: None,
            late_connections: None,
            runtime_reported: None,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("podscope-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_come_back_in_order() {
        let d = dir("order");
        let (mut j, recs, _) = Journal::open(&d, 1 << 20).unwrap();
        assert!(recs.is_empty());
        for n in 0..5 {
            j.append(&record(n)).unwrap();
        }
        drop(j);
        let (_, recs, rec) = Journal::open(&d, 1 << 20).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.pid).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(recs[3], record(3));
        assert_eq!(rec.dropped_bytes, 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Every possible torn tail: cut the last frame at each byte.
    #[test]
    fn a_torn_last_frame_is_cut_and_earlier_ones_survive() {
        let d = dir("torn");
        let (mut j, _, _) = Journal::open(&d, 1 << 20).unwrap();
        for n in 0..3 {
            j.append(&record(n)).unwrap();
        }
        let full_len = j.size();
        drop(j);
        let full = std::fs::read(d.join(FILE_NAME)).unwrap();
        let last = frame(&record(2)).len() as u64;
        for cut in (full_len - last + 1)..full_len {
            std::fs::write(d.join(FILE_NAME), &full[..cut as usize]).unwrap();
            let (mut j, recs, rec) = Journal::open(&d, 1 << 20).unwrap();
            assert_eq!(recs.len(), 2, "cut at {cut}");
            assert_eq!(rec.dropped_bytes, cut - (full_len - last));
            // Appending after the cut gives a clean journal again.
            j.append(&record(9)).unwrap();
            drop(j);
            let again = read_dir(&d);
            assert_eq!(again.iter().map(|r| r.pid).collect::<Vec<_>>(), [0, 1, 9]);
        }
        // Garbage after valid frames is cut too.
        let mut junk = full.clone();
        junk.extend_from_slice(b"\x50\x53\x4a\x31garbage");
        std::fs::write(d.join(FILE_NAME), &junk).unwrap();
        assert_eq!(Journal::open(&d, 1 << 20).unwrap().1.len(), 3);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn size_is_bounded_by_rotation() {
        let d = dir("rotate");
        let max = 64 << 10;
        let (mut j, _, _) = Journal::open(&d, max).unwrap();
        for n in 0..2000 {
            j.append(&record(n)).unwrap();
        }
        drop(j);
        let total: u64 = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= max, "{total} bytes on disk");
        let recs = read_dir(&d);
        // The newest survive, in order.
        assert_eq!(recs.last().unwrap().pid, 1999);
        assert!(recs.windows(2).all(|w| w[0].pid + 1 == w[1].pid));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A corrupt frame in the middle costs only itself, whichever of its
    /// parts is damaged: the later records are kept and the skipped bytes counted.
    #[test]
    fn a_corrupt_middle_frame_is_skipped_and_later_records_kept() {
        let d = dir("middle");
        let (mut j, _, _) = Journal::open(&d, 1 << 20).unwrap();
        for n in 0..5 {
            j.append(&record(n)).unwrap();
        }
        drop(j);
        let full = std::fs::read(d.join(FILE_NAME)).unwrap();
        let len = frame(&record(0)).len();
        // Frame 2 starts at 2 * len (records 0..5 encode to equal lengths).
        for (what, at) in [
            ("magic", 2 * len),
            ("length", 2 * len + 5),
            ("checksum", 2 * len + 9),
            ("body", 2 * len + HEADER + 7),
        ] {
            let mut bad = full.clone();
            bad[at] ^= 0x5a;
            std::fs::write(d.join(FILE_NAME), &bad).unwrap();
            let (mut j, recs, rec) = Journal::open(&d, 1 << 20).unwrap();
            assert_eq!(
                recs.iter().map(|r| r.pid).collect::<Vec<_>>(),
                [0, 1, 3, 4],
                "{what}"
            );
            assert_eq!(rec.skipped_bytes, len as u64, "{what}");
            assert_eq!(rec.dropped_bytes, 0, "{what}");
            // New records go after the last valid one; the damage stays
            // where it is and is skipped again.
            j.append(&record(9)).unwrap();
            drop(j);
            assert_eq!(
                read_dir(&d).iter().map(|r| r.pid).collect::<Vec<_>>(),
                [0, 1, 3, 4, 9],
                "{what}"
            );
        }
        // Garbage before the first frame is skipped too.
        let mut bad = b"\x50\x53\x4a\x31junk".to_vec();
        bad.extend_from_slice(&full);
        std::fs::write(d.join(FILE_NAME), &bad).unwrap();
        let (_, recs, rec) = Journal::open(&d, 1 << 20).unwrap();
        assert_eq!(recs.len(), 5);
        assert_eq!(rec.skipped_bytes, 8);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A rotation that fails (here `.1` is a directory, so the rename is
    /// refused) is retried at each record; meanwhile the current file takes
    /// records up to the whole bound, then they wait in memory; once the
    /// obstacle is gone everything reaches the disk, in order.
    #[test]
    fn a_failed_rotation_is_retried() {
        let d = dir("rotfail");
        let max = 64 << 10;
        let (mut j, _, _) = Journal::open(&d, max).unwrap();
        let blocker = d.join(format!("{FILE_NAME}.1"));
        std::fs::create_dir_all(blocker.join("x")).unwrap();
        let mut n = 0;
        while j.pending() == 0 {
            let _ = j.append(&record(n));
            n += 1;
            assert!(n < 10_000, "the journal never stopped at its bound");
        }
        assert!(j.counts.rotation_errors > 0);
        assert!(j.size() <= max && j.size() > max / 2, "{}", j.size());
        std::fs::remove_dir_all(&blocker).unwrap();
        j.append(&record(n)).unwrap();
        assert_eq!(j.pending(), 0);
        assert!(j.size() < max / 2, "rotated");
        drop(j);
        let recs = read_dir(&d);
        assert_eq!(recs.last().unwrap().pid, n);
        assert!(recs.windows(2).all(|w| w[0].pid + 1 == w[1].pid));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Files are created 0600, and an older journal's wider mode is tightened.
    #[test]
    fn journal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("mode");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(FILE_NAME), b"").unwrap();
        std::fs::set_permissions(d.join(FILE_NAME), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let (mut j, _, _) = Journal::open(&d, 1 << 20).unwrap();
        j.append(&record(1)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join(FILE_NAME)), 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A real full disk: a 256 kB tmpfs filled up. Records wait in memory,
    /// counted; when space comes back they are written, in order. Needs root
    /// (mount); skipped with a message otherwise.
    #[test]
    fn a_full_disk_keeps_records_in_memory_until_space_returns() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("PODSCOPE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"),
                "needs root to mount a tmpfs"
            );
            eprintln!(
                "SKIPPED a_full_disk_keeps_records_in_memory_until_space_returns: needs root to mount a tmpfs"
            );
            return;
        }
        let d = dir("full");
        std::fs::create_dir_all(&d).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "podscope-test"])
            .arg(&d)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let _unmount = Unmount(d.clone());
        let state = d.join("state");
        let (mut j, _, _) = Journal::open(&state, 1 << 20).unwrap();
        j.append(&record(0)).unwrap();
        // Fill the filesystem.
        let filler = d.join("filler");
        let mut f = File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        drop(f);
        // The journal's own last page may still take a record or two.
        let mut first_refused = 1;
        while j.append(&record(first_refused)).is_ok() {
            first_refused += 1;
            assert!(first_refused < 50, "the disk never filled up");
        }
        let last = first_refused + 19;
        for n in first_refused + 1..=last {
            assert!(j.append(&record(n)).is_err(), "record {n} on a full disk");
        }
        assert_eq!(j.pending(), 20);
        assert!(j.counts.write_errors >= 20);
        assert_eq!(j.counts.lost, 0);
        // Nothing half-written stays behind.
        assert_eq!(
            std::fs::metadata(state.join(FILE_NAME)).unwrap().len(),
            j.size()
        );
        std::fs::remove_file(&filler).unwrap();
        j.flush().unwrap();
        assert_eq!(j.pending(), 0);
        drop(j);
        assert_eq!(
            read_dir(&state).iter().map(|r| r.pid).collect::<Vec<_>>(),
            (0..=last).collect::<Vec<_>>()
        );
    }
}
