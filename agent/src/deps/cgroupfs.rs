//! cgroupfs, read off the drain thread: `cpu.stat` of every live container
//! once a second (the throttling cross-check), a scan of the v2 tree every
//! 30 s (a lost cgroup creation or removal event must not leave the map
//! wrong forever), and the main process of containers found at start-up.
//! Each read runs on the blocking pool under a deadline, one of each kind
//! in flight at most: a hung cgroupfs (or /proc) delays these features
//! only, counted and reported.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use super::{Dependency, Health};
use crate::{
    driver::{DriverLink, Input},
    forensics::guess_main,
    kernel::cgroups::CgroupLayout,
    metadata::cgroup_map,
    throttle::{ThrottleBook, read_cpu_stats},
};

#[derive(Clone, Debug)]
pub struct CgroupfsOptions {
    /// How often cpu.stat is read (when a throttle book is fed).
    pub stat_interval: Duration,
    /// How often the v2 tree is scanned.
    pub scan_interval: Duration,
    /// How long one round of reads may take before it counts as hung.
    pub timeout: Duration,
}

impl Default for CgroupfsOptions {
    fn default() -> Self {
        CgroupfsOptions {
            stat_interval: Duration::from_secs(1),
            scan_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(2),
        }
    }
}

/// One kind of read: at most one in flight.
#[derive(Clone, Default)]
struct InFlight(Arc<AtomicBool>);

impl InFlight {
    /// Runs `f` on the blocking pool unless the previous run is still going;
    /// None when skipped or when it missed `timeout` (it then finishes in
    /// the background, and the next one waits for it).
    async fn run<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Option<T>, ()> {
        if self.0.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        let flag = self.0.clone();
        let task = tokio::task::spawn_blocking(move || {
            let r = f();
            flag.store(false, Ordering::Release);
            r
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(_)) => {
                self.0.store(false, Ordering::Release);
                Err(())
            }
            Err(_) => Err(()),
        }
    }
}

/// Starts the cgroupfs task; `book`, when given, gets every container's
/// `cpu.stat` each [`CgroupfsOptions::stat_interval`].
pub fn spawn(
    opts: CgroupfsOptions,
    link: DriverLink,
    book: Option<Arc<Mutex<ThrottleBook>>>,
    health: Arc<Health>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let layout = CgroupLayout::current();
        let (stats, scans, adoptions) = (
            InFlight::default(),
            InFlight::default(),
            InFlight::default(),
        );
        // The first cpu.stat round is every container's baseline: it must
        // see the containers that exist now, so wait for the drain
        // thread's first status (a container seen later counts from 0, its
        // creation, and one taken for new would be counted twice).
        link.first_status(Duration::from_secs(5)).await;
        let mut tick = tokio::time::interval(opts.stat_interval);
        let mut next_scan = Instant::now() + opts.scan_interval;
        loop {
            tick.tick().await;
            let mut hung = vec![];
            if let Some(book) = &book {
                let live = link.status.borrow().live_containers.clone();
                let l = layout.clone();
                match stats
                    .run(opts.timeout, move || read_cpu_stats(&l, &live))
                    .await
                {
                    Ok(Some(readings)) => {
                        // Events that began before the reading reach the
                        // book before the reading is applied.
                        let (ack_tx, ack) = std::sync::mpsc::channel();
                        if link.send(Input::Flush(ack_tx)) {
                            let _ = tokio::task::spawn_blocking(move || {
                                ack.recv_timeout(Duration::from_secs(1))
                            })
                            .await;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if let Ok(mut b) = book.lock() {
                            b.apply(readings);
                            b.forget_gone();
                        }
                    }
                    Ok(None) => hung.push("cpu.stat"),
                    Err(()) => hung.push("cpu.stat"),
                }
            }
            let unadopted = link.unadopted();
            if !unadopted.is_empty() {
                let found = adoptions
                    .run(opts.timeout, move || {
                        unadopted
                            .into_iter()
                            .map(|(id, dir)| (id, guess_main(&dir), dir.exists()))
                            .collect::<Vec<_>>()
                    })
                    .await;
                match found {
                    Ok(Some(found)) => {
                        for (cgroup_id, main, dir_exists) in found {
                            link.send(Input::Adoption {
                                cgroup_id,
                                main,
                                dir_exists,
                            });
                        }
                    }
                    _ => hung.push("cgroup.procs"),
                }
            }
            if Instant::now() >= next_scan
                && let Some(root) = layout.v2_root().map(|p| p.to_path_buf())
            {
                next_scan = Instant::now() + opts.scan_interval;
                let started = Instant::now();
                match scans
                    .run(opts.timeout * 5, move || cgroup_map::scan(&root))
                    .await
                {
                    Ok(Some(found)) => {
                        link.send(Input::CgroupScan(found, started));
                    }
                    _ => hung.push("the cgroup tree scan"),
                }
            }
            if hung.is_empty() {
                health.ok(Dependency::Cgroupfs);
            } else {
                health.degraded(
                    Dependency::Cgroupfs,
                    format!(
                        "{} did not finish within {:?}",
                        hung.join(", "),
                        opts.timeout
                    ),
                );
            }
        }
    })
}
