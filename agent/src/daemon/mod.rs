//! `podscope agent`: the DaemonSet's daemon. Starts the [`Driver`] (the
//! drain thread), the dependency tasks that feed it (CRI, kube-proxy's
//! rules, cgroupfs), the consumers that read its events (metrics,
//! termination records and their journal, HTTP streams), serves
//! Prometheus on `--listen`, and the node-wide API on its unix socket
//! (`--api-socket`; on TCP only with `--api-listen`, TLS and
//! authentication). Nothing here can stall the drain: see [`crate::deps`].

pub mod config;
pub mod http;
pub mod server;
pub mod socket;
pub mod tls;

use std::{
    path::Path,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use tokio::{signal::unix::SignalKind, sync::broadcast::error::RecvError};

use self::{
    config::{AgentArgs, AgentConfig},
    http::AppState,
};
use crate::{
    deps::{self, Dependency, Health},
    driver::{Driver, DriverLink, DriverOptions},
    events::Event,
    forensics::{
        journal::Journal,
        store::{JournalStats, JournalWriter, StoreLimits, TerminationStore},
    },
    kernel::privilege::Privileges,
    metadata::ResolverOptions,
    metrics::{ConsumerLabels, Metrics, MetricsOptions, SeriesBudget},
    probes::LoadOptions,
    throttle::ThrottleBook,
};

pub fn run(args: AgentArgs) -> Result<ExitCode> {
    let cfg = match AgentConfig::resolve(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("podscope: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    Privileges::current()
        .require_tracing()
        .map_err(|m| anyhow!(m))?;
    // Held until the agent ends: one agent per state directory.
    let _state_lock = match crate::forensics::state_dir::lock(&cfg.state_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("podscope: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    // After the state directory's lock: a second agent on the same state
    // directory is named by that lock, whatever its socket.
    let own_dir = Path::new(config::DEFAULT_API_SOCKET).parent() == cfg.api_socket.parent();
    let api_socket = match socket::ApiSocket::bind(&cfg.api_socket, own_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("podscope: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    // Two workers: HTTP, consumers and dependency tasks share them; the
    // drain runs on a thread of its own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The socket file goes with `api_socket`, when serve is done with it.
    let code = rt.block_on(serve(cfg, api_socket));
    // A dependency stuck in a blocking read must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn serve(cfg: AgentConfig, mut api_socket: socket::ApiSocket) -> Result<ExitCode> {
    // Bind first: a port clash fails before anything is loaded into the kernel.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
    let metrics_tls = match &cfg.metrics_tls {
        Some(t) => Some(tls::ListenerTls::load(t).map_err(|e| anyhow!(e))?),
        None => None,
    };
    let unix = api_socket
        .take_listener()
        .context("the API socket was already taken")?;
    let unix = unix
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(unix))
        .with_context(|| format!("cannot serve on {}", api_socket.path().display()))?;
    let api_tcp = match &cfg.api_listen {
        Some((addr, t)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--api-listen)"))?;
            Some((l, tls::ListenerTls::load(t).map_err(|e| anyhow!(e))?))
        }
        None => None,
    };
    let opts = DriverOptions {
        load: LoadOptions::with_ring_buffer(cfg.ring_buffer_size),
        resolver: ResolverOptions {
            cri_socket: cfg.cri_socket.clone(),
            use_cri: cfg.use_cri,
            retention: cfg.series_retention,
            ..Default::default()
        },
        net: true,
        netns: cfg.netns.clone(),
        throttle: true,
        ..Default::default()
    };
    let driver = Driver::start(&opts)?;
    let link = driver.link();
    let health = Arc::new(Health::new());
    let metrics = Metrics::new(&MetricsOptions {
        budget: SeriesBudget::new(cfg.max_series),
        series_retention: cfg.series_retention,
        node_name: cfg.node_name.clone(),
    });
    metrics.set_probes(&driver.attachments, &driver.unavailable);
    let deps = deps::spawn_all(
        &driver,
        &opts,
        &health,
        deps::rules::RulesOptions {
            netns: cfg.netns.clone(),
            timeout: cfg.rules_timeout,
            ..Default::default()
        },
        true,
    );
    let (store, journal) = open_journal(&cfg, &health);
    let state = Arc::new(AppState {
        stream_dropped: metrics.stream_dropped.clone(),
        metrics: Mutex::new(metrics),
        ready: Default::default(),
        driver: link.clone(),
        terminations: Mutex::new(store),
        health: health.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(http::MAX_STREAMS)),
    });
    let records = spawn_records(
        &link,
        state.clone(),
        journal.as_ref().map(JournalWriter::handle),
    );
    let counting = spawn_metrics(
        &link,
        state.clone(),
        deps.book.clone(),
        deps.rule_errors.clone(),
        journal.as_ref().map(|j| j.stats.clone()),
    );
    let refused = state
        .metrics
        .lock()
        .map(|m| m.http_refused.clone())
        .unwrap_or_default();
    // Before "attached" is logged: from then on SIGTERM is a clean stop.
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    // Every listener stops when this turns true.
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = http_stopped.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let limits = server::Limits::default();
    let mut servers = vec![
        tokio::spawn(server::serve(
            listener,
            http::metrics_router(state.clone(), api_socket.path()),
            metrics_tls,
            limits.clone(),
            refused.clone(),
            stopped(),
        )),
        tokio::spawn(server::serve(
            unix,
            http::router(state.clone()),
            None,
            limits.clone(),
            refused.clone(),
            stopped(),
        )),
    ];
    if let Some((l, t)) = api_tcp {
        servers.push(tokio::spawn(server::serve(
            l,
            http::router(state.clone()),
            Some(t),
            limits,
            refused,
            stopped(),
        )));
    }
    let api_tcp = cfg
        .api_listen
        .as_ref()
        .map(|(a, _)| format!(" and on {a} (TLS, authenticated)"))
        .unwrap_or_default();
    tracing::info!(
        "attached; serving /metrics, /healthz, /readyz on {}; the node-wide API (/api/v1/events, /api/v1/terminations) on {}{api_tcp}",
        cfg.listen,
        api_socket.path().display()
    );

    let mut status = link.status.clone();
    loop {
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                let synced = status.borrow_and_update().metadata_synced;
                state.ready.store(synced, Ordering::Relaxed);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    // SIGTERM: stop answering ready, publish what the kernel and forensics
    // hold, let the consumers take it, make the journal durable, go. Each
    // step has its deadline: together well within 2 s.
    state.ready.store(false, Ordering::Relaxed);
    let stopped = tokio::task::spawn_blocking(move || driver.stop(Duration::from_millis(800)))
        .await
        .unwrap_or(false);
    if !stopped {
        tracing::warn!("the drain thread did not stop in time; exiting anyway");
    }
    records.wait_caught_up(Duration::from_millis(300)).await;
    records.task.abort();
    for t in deps.tasks {
        t.abort();
    }
    counting.abort();
    if let Some(j) = journal
        && !tokio::task::spawn_blocking(move || j.close(Duration::from_millis(500)))
            .await
            .unwrap_or(false)
    {
        tracing::warn!(
            "the journal did not finish writing in time; the last records may be missing on disk"
        );
    }
    let _ = stop_http.send(true);
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        futures_util::future::join_all(servers),
    )
    .await;
    // Nothing listens any more: the socket file goes.
    drop(api_socket);
    tracing::info!("probes detached; bye");
    Ok(ExitCode::SUCCESS)
}

/// The metrics consumer: every event into the registry, the driver's and
/// the dependencies' counters once a second.
fn spawn_metrics(
    link: &DriverLink,
    state: Arc<AppState>,
    book: Arc<Mutex<ThrottleBook>>,
    rule_errors: Arc<AtomicU64>,
    journal: Option<Arc<JournalStats>>,
) -> tokio::task::JoinHandle<()> {
    let mut rx = link.subscribe();
    let status = link.status.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        let mut journal_seen = (0u64, 0u64);
        let lagged = state
            .metrics
            .lock()
            .map(|m| {
                m.consumer_lagged
                    .get_or_create(&ConsumerLabels {
                        consumer: "metrics".into(),
                    })
                    .clone()
            })
            .unwrap_or_default();
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(p) => {
                        if let Ok(mut m) = state.metrics.lock() {
                            m.observe(&p.event, Instant::now());
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        lagged.inc_by(n);
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    let st = status.borrow().clone();
                    if let Some(j) = &journal {
                        let now = (j.written.load(Ordering::Relaxed), j.errors.load(Ordering::Relaxed));
                        if now.1 > journal_seen.1 {
                            state.health.degraded(Dependency::Journal, "records could not be written to the state directory");
                        } else if now.0 > journal_seen.0 {
                            state.health.ok(Dependency::Journal);
                        }
                        journal_seen = now;
                    }
                    let report = state.health.report();
                    let book = book.lock().ok();
                    if let Ok(mut m) = state.metrics.lock() {
                        m.update(&st, book.as_deref(), rule_errors.load(Ordering::Relaxed));
                        m.update_health(&report);
                        m.update_process(&st, book.as_deref());
                        if let Some(j) = &journal {
                            m.update_journal(j);
                        }
                        if let Ok(s) = state.terminations.lock() {
                            m.update_store(s.usage());
                        }
                        if ticks.is_multiple_of(30) {
                            m.gc(&st, Instant::now());
                        }
                    }
                    if ticks.is_multiple_of(60) {
                        // glibc (the test build; the shipped static binary
                        // is musl's, which needs no asking) returns freed
                        // pages from the middle of its heaps only when
                        // asked: without this, churn left
                        // the resident size above what the agent holds
                        // (1.1 MiB of 43.8 at the end of a 45-minute soak),
                        // and a leak could not be told from fragmentation.
                        crate::kernel::release_freed_memory();
                    }
                }
            }
        }
    })
}

/// The records consumer: terminations into the store and the journal,
/// background deaths into the store.
struct Records {
    processed: Arc<AtomicU64>,
    link: DriverLink,
    task: tokio::task::JoinHandle<()>,
}

impl Records {
    /// Waits (at most `deadline`) until the consumer has taken everything
    /// the driver published.
    async fn wait_caught_up(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            let published = self.link.status.borrow().published;
            if self.processed.load(Ordering::Relaxed) >= published {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn spawn_records(
    link: &DriverLink,
    state: Arc<AppState>,
    journal: Option<crate::forensics::store::JournalHandle>,
) -> Records {
    let mut rx = link.subscribe();
    let processed = Arc::new(AtomicU64::new(0));
    let p = processed.clone();
    let lagged = state
        .metrics
        .lock()
        .map(|m| {
            m.consumer_lagged
                .get_or_create(&ConsumerLabels {
                    consumer: "records".into(),
                })
                .clone()
        })
        .unwrap_or_default();
    let task = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    match &ev.event {
                        Event::Termination(t) => {
                            if let Some(j) = &journal {
                                j.write((**t).clone());
                            }
                            if let Ok(mut s) = state.terminations.lock() {
                                s.add((**t).clone());
                            }
                        }
                        Event::BackgroundDeath(d) => {
                            if let Ok(mut s) = state.terminations.lock() {
                                s.add_death(d.clone());
                            }
                        }
                        Event::Respawn(r) => {
                            if let Ok(mut s) = state.terminations.lock() {
                                s.add_respawn(r.clone());
                            }
                        }
                        _ => {}
                    }
                    p.fetch_add(1, Ordering::Relaxed);
                }
                Err(RecvError::Lagged(n)) => {
                    lagged.inc_by(n);
                    p.fetch_add(n, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Records {
        processed,
        link: link.clone(),
        task,
    }
}

/// The journal in the state directory and the records it holds. A journal
/// that cannot be opened is logged and the agent runs on without it.
fn open_journal(cfg: &AgentConfig, health: &Health) -> (TerminationStore, Option<JournalWriter>) {
    let mut store = TerminationStore::new(StoreLimits {
        bytes: usize::try_from(cfg.records_memory_bytes).unwrap_or(usize::MAX),
        ..StoreLimits::default()
    });
    match Journal::open(&cfg.state_dir, cfg.journal_max_bytes) {
        Ok((journal, records, recovery)) => {
            tracing::info!(
                "termination journal: {} records from {}",
                recovery.records,
                cfg.state_dir.display()
            );
            for r in records {
                store.add(r);
            }
            let stats = Arc::new(JournalStats::default());
            stats
                .recovered_dropped_bytes
                .store(recovery.dropped_bytes, Ordering::Relaxed);
            match JournalWriter::spawn(journal, stats) {
                Ok(w) => (store, Some(w)),
                Err(e) => {
                    health.degraded(
                        Dependency::Journal,
                        format!("cannot start the journal thread ({e})"),
                    );
                    (store, None)
                }
            }
        }
        Err(e) => {
            health.degraded(Dependency::Journal, e.to_string());
            (store, None)
        }
    }
}
