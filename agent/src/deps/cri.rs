//! The CRI task: the only code that talks to the container runtime. It
//! lists containers and sandboxes (each call under a deadline), asks each
//! new sandbox for its IPs once (failed ones are not asked again for a
//! while), and hands the drain thread a fresh [`Names`] snapshot after each
//! listing. It lists when the drain thread meets a container it cannot name,
//! when the runtime's event stream (`GetContainerEvents`) says something
//! changed, and every 30 s otherwise (every 5 s where the runtime has no
//! event stream, as containerd 1.6). A container seen exiting is asked
//! once how it ended (ContainerStatus): the reason kubelet will show,
//! which termination records set beside their own.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio::sync::Notify;

use super::{Backoff, Dependency, Health};
use crate::metadata::{
    CriState, Names, ResolverOptions,
    cri::{ContainerMeta, Cri, RuntimeEnd, SandboxMeta},
};

/// How long a failed PodSandboxStatus is not asked again.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Listings at most this often, however many unknown containers appear.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// ContainerStatus calls at most per listing (a mass exit is asked over
/// the next listings, not in one burst at a runtime that is busy with it).
const ENDS_PER_LISTING: usize = 64;

pub struct CriTask {
    socket: PathBuf,
    timeout: Duration,
    retention: Duration,
    cri: Option<Cri>,
    containers: HashMap<String, (Arc<ContainerMeta>, Option<Instant>)>,
    sandboxes: HashMap<String, (Arc<SandboxMeta>, Option<Instant>)>,
    pod_ips: HashMap<std::net::IpAddr, String>,
    ips_known: HashSet<String>,
    /// Sandboxes whose status failed, and when: not asked again before [`NEGATIVE_TTL`].
    ips_failed: HashMap<String, Instant>,
    /// Container id → how the runtime reported its end.
    ends: HashMap<String, Arc<RuntimeEnd>>,
    /// Containers whose end is not asked: exited before the first listing
    /// (their records, if any, were made before), or asked in vain.
    ends_unasked: HashSet<String>,
    listed_once: bool,
    refreshes: u64,
    errors: u64,
    state: CriState,
    listed_at: Option<Instant>,
    health: Arc<Health>,
}

/// Starts the CRI task when a socket is configured or found. `wanted` wakes
/// it for a listing; `publish` receives each new snapshot (it must not block).
pub fn spawn(
    opts: &ResolverOptions,
    wanted: Arc<Notify>,
    health: Arc<Health>,
    publish: impl Fn(Arc<Names>) + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let task = new_task(opts, health)?;
    Some(tokio::spawn(task.run(wanted, publish)))
}

/// One listing, as the task makes it (benchmarks, tests): None without a socket.
pub async fn list_once(opts: &ResolverOptions) -> Option<Arc<Names>> {
    let mut task = new_task(opts, Arc::new(Health::new()))?;
    task.refresh().await;
    Some(Arc::new(task.snapshot()))
}

fn new_task(opts: &ResolverOptions, health: Arc<Health>) -> Option<CriTask> {
    Some(CriTask {
        socket: opts.socket()?,
        timeout: opts.cri_timeout,
        retention: opts.retention,
        cri: None,
        containers: HashMap::new(),
        sandboxes: HashMap::new(),
        pod_ips: HashMap::new(),
        ips_known: HashSet::new(),
        ips_failed: HashMap::new(),
        ends: HashMap::new(),
        ends_unasked: HashSet::new(),
        listed_once: false,
        refreshes: 0,
        errors: 0,
        state: CriState::Connecting,
        listed_at: None,
        health,
    })
}

impl CriTask {
    async fn run(mut self, wanted: Arc<Notify>, publish: impl Fn(Arc<Names>)) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        // The runtime's event stream, while it has one and it is open.
        let mut events: Option<futures_util::stream::BoxStream<'static, ()>> = None;
        let mut events_supported = true;
        let mut next_periodic = Instant::now();
        loop {
            let ok = self.refresh().await;
            publish(Arc::new(self.snapshot()));
            // Names first; then how the containers that exited ended, which
            // only the records waiting for it need.
            let mut ends_left = false;
            if ok {
                let (asked, left) = self.refresh_ends().await;
                ends_left = left;
                if asked {
                    publish(Arc::new(self.snapshot()));
                }
            }
            let wait = if ok {
                backoff.succeeded();
                if events.is_none() && events_supported {
                    match self.subscribe().await {
                        Ok(s) => events = Some(s),
                        Err(unsupported) => events_supported = !unsupported,
                    }
                }
                let period = if events.is_some() {
                    Duration::from_secs(30)
                } else {
                    Duration::from_secs(5)
                };
                // More exited containers than one pass asks: the next
                // listing comes at once, not after the period.
                next_periodic = Instant::now() + if ends_left { Duration::ZERO } else { period };
                None
            } else {
                events = None;
                Some(backoff.failed())
            };
            // While CRI fails, nothing but the back-off wakes a retry: a
            // storm of unknown containers must not hammer a sick runtime.
            match wait {
                Some(w) => tokio::time::sleep(w).await,
                None => {
                    let until = tokio::time::Instant::from_std(next_periodic);
                    tokio::select! {
                        _ = wanted.notified() => {}
                        _ = tokio::time::sleep_until(until) => {}
                        ev = next_event(&mut events) => {
                            if ev.is_none() {
                                events = None;
                            }
                        }
                    }
                    tokio::time::sleep(MIN_INTERVAL).await;
                }
            }
        }
    }

    /// The runtime's container event stream; Err(true) when it has none.
    async fn subscribe(&mut self) -> Result<futures_util::stream::BoxStream<'static, ()>, bool> {
        let cri = self.cri.as_mut().ok_or(false)?;
        match tokio::time::timeout(self.timeout, cri.events()).await {
            Ok(Ok(s)) => Ok(s.map(|_| ()).boxed()),
            Ok(Err(unsupported)) => Err(unsupported),
            Err(_) => Err(false),
        }
    }

    /// Lists containers and sandboxes; false when CRI failed or timed out.
    async fn refresh(&mut self) -> bool {
        let asked = Instant::now();
        match self.list().await {
            Ok((containers, sandboxes)) => {
                self.refreshes += 1;
                self.state = CriState::Up;
                self.health.ok(Dependency::Cri);
                merge(
                    &mut self.containers,
                    containers.into_iter().map(|c| (c.id.clone(), c)),
                    asked,
                );
                merge(
                    &mut self.sandboxes,
                    sandboxes.into_iter().map(|s| (s.id.clone(), s)),
                    asked,
                );
                self.refresh_pod_ips().await;
                self.note_exited_before_us();
                self.forget_expired(asked);
                self.listed_at = Some(asked);
                true
            }
            Err(e) => {
                self.errors += 1;
                self.state = CriState::Down;
                self.health.degraded(Dependency::Cri, e);
                // A fresh connection next time: the runtime may have restarted.
                self.cri = None;
                false
            }
        }
    }

    async fn list(&mut self) -> Result<(Vec<ContainerMeta>, Vec<SandboxMeta>), String> {
        let timeout = self.timeout;
        if self.cri.is_none() {
            self.cri = Some(Cri::connect(&self.socket).await?);
        }
        let Some(cri) = self.cri.as_mut() else {
            return Err("not connected".into());
        };
        let deadline = |what: &str| format!("{what} did not answer within {timeout:?}");
        let containers = tokio::time::timeout(timeout, cri.containers())
            .await
            .map_err(|_| deadline("ListContainers"))??;
        let sandboxes = tokio::time::timeout(timeout, cri.sandboxes())
            .await
            .map_err(|_| deadline("ListPodSandbox"))??;
        Ok((containers, sandboxes))
    }

    /// Asks CRI for the IPs of sandboxes not asked about yet (an IP does not
    /// change in a sandbox's life); a failed sandbox is not asked again for
    /// [`NEGATIVE_TTL`].
    async fn refresh_pod_ips(&mut self) {
        let now = Instant::now();
        self.ips_failed
            .retain(|_, t| now.duration_since(*t) < NEGATIVE_TTL);
        let new: Vec<String> = self
            .sandboxes
            .iter()
            .filter(|(id, (_, gone))| {
                gone.is_none()
                    && !self.ips_known.contains(*id)
                    && !self.ips_failed.contains_key(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let timeout = self.timeout;
        for id in new {
            let Some(cri) = self.cri.as_mut() else { return };
            match tokio::time::timeout(timeout, cri.sandbox_ips(&id)).await {
                Ok(Ok(ips)) => {
                    for ip in ips {
                        self.pod_ips.insert(ip, id.clone());
                    }
                    self.ips_known.insert(id);
                }
                Ok(Err(e)) => {
                    self.errors += 1;
                    tracing::debug!("{e}");
                    self.ips_failed.insert(id, now);
                }
                Err(_) => {
                    self.errors += 1;
                    self.ips_failed.insert(id, now);
                }
            }
        }
    }

    /// The containers already exited at the first listing: their end is
    /// not asked (their records, if any, were made before).
    fn note_exited_before_us(&mut self) {
        if self.listed_once {
            return;
        }
        self.listed_once = true;
        self.ends_unasked.extend(
            self.containers
                .iter()
                .filter(|(_, (c, _))| c.exited)
                .map(|(id, _)| id.clone()),
        );
    }

    /// Asks each container that exited since the first listing how it
    /// ended, once: at most [`ENDS_PER_LISTING`] a pass and one deadline
    /// for the whole pass, which a slow runtime ends (the rest are asked
    /// after the next listing). A failed or empty answer is not asked
    /// again: the record goes out without the runtime's word, as when CRI
    /// is down. Returns whether anything was asked, and whether exited
    /// containers are left to ask.
    async fn refresh_ends(&mut self) -> (bool, bool) {
        let mut new: Vec<String> = self
            .containers
            .iter()
            .filter(|(id, (c, gone))| {
                c.exited
                    && gone.is_none()
                    && !self.ends.contains_key(*id)
                    && !self.ends_unasked.contains(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let left = new.len() > ENDS_PER_LISTING;
        new.truncate(ENDS_PER_LISTING);
        let deadline = tokio::time::Instant::now() + self.timeout;
        for id in &new {
            let Some(cri) = self.cri.as_mut() else {
                break;
            };
            match tokio::time::timeout_at(deadline, cri.container_end(id)).await {
                Ok(Ok(Some(end))) => {
                    self.ends.insert(id.clone(), Arc::new(end));
                }
                // Removed since the listing, or no end to tell.
                Ok(Ok(None)) => {
                    self.ends_unasked.insert(id.clone());
                }
                Ok(Err(e)) => {
                    self.errors += 1;
                    tracing::debug!("{e}");
                    self.ends_unasked.insert(id.clone());
                }
                Err(_) => {
                    self.errors += 1;
                    tracing::debug!(
                        "ContainerStatus did not answer within {:?}: the ends of exited containers are asked after the next listing",
                        self.timeout
                    );
                    return (true, true);
                }
            }
        }
        (!new.is_empty(), left)
    }

    fn forget_expired(&mut self, now: Instant) {
        let retention = self.retention;
        let keep = |gone: &Option<Instant>| gone.is_none_or(|t| now.duration_since(t) < retention);
        self.containers.retain(|_, (_, gone)| keep(gone));
        self.sandboxes.retain(|_, (_, gone)| keep(gone));
        let sandboxes = &self.sandboxes;
        self.pod_ips.retain(|_, id| sandboxes.contains_key(id));
        self.ips_known.retain(|id| sandboxes.contains_key(id));
        let containers = &self.containers;
        self.ends.retain(|id, _| containers.contains_key(id));
        self.ends_unasked.retain(|id| containers.contains_key(id));
    }

    fn snapshot(&self) -> Names {
        Names {
            state: self.state,
            listed_at: self.listed_at,
            containers: self.containers.clone(),
            sandboxes: self.sandboxes.clone(),
            pod_ips: self.pod_ips.clone(),
            ends: self.ends.clone(),
            no_ends: self.ends_unasked.clone(),
            refreshes: self.refreshes,
            errors: self.errors,
        }
    }
}

async fn next_event(
    events: &mut Option<futures_util::stream::BoxStream<'static, ()>>,
) -> Option<()> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Replaces a cache with what CRI listed now; entries it no longer lists are
/// kept, marked gone, for the retention.
fn merge<T>(
    cache: &mut HashMap<String, (Arc<T>, Option<Instant>)>,
    listed: impl Iterator<Item = (String, T)>,
    now: Instant,
) {
    let mut seen = HashSet::new();
    for (id, v) in listed {
        seen.insert(id.clone());
        cache.insert(id, (Arc::new(v), None));
    }
    for (id, (_, gone)) in cache.iter_mut() {
        if !seen.contains(id) {
            gone.get_or_insert(now);
        }
    }
}
