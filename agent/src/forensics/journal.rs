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
//! at the end. Opening the journal reads every valid frame, cuts the file
//! at the first invalid one (counted and logged, never fatal) and appends
//! after it; earlier frames are never rewritten.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::record::TerminationRecord;

const MAGIC: u32 = 0x314a_5350; // "PSJ1", little-endian
const HEADER: usize = 12;
/// A record is a few kB; anything larger is corruption, not data.
const MAX_FRAME: usize = 1 << 20;
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
}

pub struct Journal {
    dir: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    /// Fault injection for the crash test: write each frame in two halves
    /// this many ms apart (`PODSCOPE_JOURNAL_SPLIT_WRITE_MS`).
    split_write_ms: u64,
    pub written: u64,
    pub write_errors: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and returns every record it
    /// holds, oldest first.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(Journal, Vec<TerminationRecord>, Recovery), JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let current = dir.join(FILE_NAME);
        let previous = dir.join(format!("{FILE_NAME}.1"));
        let mut records = vec![];
        let mut recovery = Recovery::default();
        if let Ok(data) = std::fs::read(&previous) {
            let (recs, good) = parse(&data);
            records.extend(recs);
            recovery.dropped_bytes += (data.len() - good) as u64;
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
        let (recs, good) = parse(&data);
        records.extend(recs);
        recovery.dropped_bytes += (data.len() - good) as u64;
        recovery.records = records.len();
        let io = |what, source| JournalError::Io {
            what,
            path: current.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&current)
            .map_err(|e| io("open", e))?;
        if good < data.len() {
            tracing::warn!(
                "the termination journal {} ended in {} bytes of a torn write (the agent was killed while writing); they were cut off, every earlier record is kept",
                current.display(),
                data.len() - good
            );
            file.set_len(good as u64).map_err(|e| io("truncate", e))?;
            file.sync_data().map_err(|e| io("sync", e))?;
        }
        let split_write_ms = std::env::var("PODSCOPE_JOURNAL_SPLIT_WRITE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                file,
                size: good as u64,
                max_bytes: max_bytes.max(64 << 10),
                split_write_ms,
                written: 0,
                write_errors: 0,
            },
            records,
            recovery,
        ))
    }

    /// Appends one record durably. Errors are returned for counting; the
    /// record stays in memory either way.
    pub fn append(&mut self, record: &TerminationRecord) -> Result<(), JournalError> {
        let frame = frame(record);
        if self.size + frame.len() as u64 > self.max_bytes / 2 {
            self.rotate()?;
        }
        let path = self.dir.join(FILE_NAME);
        let io = |what, source| JournalError::Io {
            what,
            path: path.clone(),
            source,
        };
        // O_APPEND is not used: after a cut the offset is the file's end anyway.
        use std::io::{Seek, SeekFrom};
        self.file
            .seek(SeekFrom::Start(self.size))
            .map_err(|e| io("seek in", e))?;
        let result = if self.split_write_ms > 0 {
            let (a, b) = frame.split_at(frame.len() / 2);
            self.file.write_all(a).and_then(|_| {
                let _ = self.file.sync_data();
                std::thread::sleep(std::time::Duration::from_millis(self.split_write_ms));
                self.file.write_all(b)
            })
        } else {
            self.file.write_all(&frame)
        };
        if let Err(e) = result.and_then(|_| self.file.sync_data()) {
            self.write_errors += 1;
            // Whatever part reached the file is cut at the next open.
            return Err(io("write to", e));
        }
        self.size += frame.len() as u64;
        self.written += 1;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), JournalError> {
        let current = self.dir.join(FILE_NAME);
        let previous = self.dir.join(format!("{FILE_NAME}.1"));
        let io = |what, source| JournalError::Io {
            what,
            path: current.clone(),
            source,
        };
        std::fs::rename(&current, &previous).map_err(|e| io("rotate", e))?;
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&current)
            .map_err(|e| io("create", e))?;
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

/// Every valid frame from the start, and where the valid part ends.
fn parse(data: &[u8]) -> (Vec<TerminationRecord>, usize) {
    let mut out = vec![];
    let mut at = 0;
    while data.len() - at >= HEADER {
        let word =
            |i: usize| u32::from_le_bytes(data[at + i..at + i + 4].try_into().unwrap_or([0; 4]));
        let (magic, len, crc) = (word(0), word(4) as usize, word(8));
        if magic != MAGIC || len > MAX_FRAME || data.len() - at - HEADER < len {
            break;
        }
        let body = &data[at + HEADER..at + HEADER + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        match serde_json::from_slice(body) {
            Ok(r) => out.push(r),
            // A valid frame from a newer podscope with fields this one does
            // not know is skipped, not a reason to stop.
            Err(e) => tracing::debug!("skipping a journal record this version cannot read: {e}"),
        }
        at += HEADER + len;
    }
    (out, at)
}

/// Reads the records of a journal directory without opening it for writing.
pub fn read_dir(dir: &Path) -> Vec<TerminationRecord> {
    let mut out = vec![];
    for name in [format!("{FILE_NAME}.1"), FILE_NAME.to_string()] {
        let mut data = vec![];
        if let Ok(mut f) = File::open(dir.join(name)) {
            let _ = f.read_to_end(&mut data);
            out.extend(parse(&data).0);
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
                pod: Some(format!("pod-{n}")),
                pod_uid: Some("uid".into()),
                container: Some("app".into()),
                container_id: Some(format!("{n:064x}")),
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
            trigger: None,
            pre_stop: None,
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
}
