//! `podscope agent`: the DaemonSet's daemon. Runs the [`Pipeline`], counts
//! every event into the metrics, streams it to HTTP readers, and serves
//! Prometheus.

pub mod config;
pub mod http;
pub mod tls;

use std::{
    process::ExitCode,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use tokio::{signal::unix::SignalKind, sync::broadcast};

use self::{
    config::{AgentArgs, AgentConfig},
    http::AppState,
};
use crate::{
    forensics::{
        journal::Journal,
        store::{JournalStats, JournalWriter, TerminationStore},
    },
    kernel::privilege::Privileges,
    metadata::ResolverOptions,
    metrics::{Metrics, MetricsOptions},
    pipeline::{DRAIN_INTERVAL, Pipeline, PipelineOptions, Rings},
    probes::LoadOptions,
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: AgentConfig) -> Result<ExitCode> {
    // Bind first: a port clash fails before anything is loaded into the kernel.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
    let metrics_tls = match &cfg.metrics_tls {
        Some(t) => Some(tls::MetricsTls::load(t).map_err(|e| anyhow!(e))?),
        None => None,
    };
    let opts = PipelineOptions {
        load: LoadOptions::with_ring_buffer(cfg.ring_buffer_size),
        exits_attach: None,
        resolver: ResolverOptions {
            cri_socket: cfg.cri_socket.clone(),
            use_cri: cfg.use_cri,
            retention: cfg.series_retention,
            ..Default::default()
        },
        net: true,
        netns: cfg.netns.clone(),
        throttle: true,
    };
    let mut pipeline = Pipeline::start(&opts).await?;
    let metrics = Metrics::new(&MetricsOptions {
        max_series: cfg.max_series,
        series_retention: cfg.series_retention,
        node_name: cfg.node_name.clone(),
    });
    metrics.set_probes(pipeline.attachments(), &pipeline.unavailable);
    let stream_dropped = metrics.stream_dropped.clone();
    let (store, journal) = open_journal(&cfg);
    let (tx, _) = broadcast::channel(16_384);
    let state = Arc::new(AppState {
        metrics: Mutex::new(metrics),
        ready: Default::default(),
        events: tx.clone(),
        stream_dropped,
        terminations: Mutex::new(store),
    });
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tls::serve_metrics(
        listener,
        metrics_tls,
        http::router(state.clone()),
        async {
            let _ = http_stopped.await;
        },
    ));
    tracing::info!(listen = %cfg.listen, "attached; serving /metrics, /healthz, /readyz, /api/v1/events, /api/v1/terminations");

    // Dropped before the pipeline, which owns the fds.
    let rings =
        Rings::register(&pipeline).map_err(|e| anyhow!("cannot poll the ring buffers: {e}"))?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = rings.readable() => {
                deliver(&mut pipeline, &state, &tx, journal.as_ref()).await;
            }
            _ = tick.tick() => {
                deliver(&mut pipeline, &state, &tx, journal.as_ref()).await;
                ticks += 1;
                if !ticks.is_multiple_of(10) {
                    continue;
                }
                pipeline.tick().await;
                let sources = pipeline.source_stats();
                if let Ok(mut m) = state.metrics.lock() {
                    m.update(&sources, &pipeline);
                    if let Some(j) = &journal {
                        m.update_journal(&j.stats);
                    }
                    if ticks.is_multiple_of(300) {
                        m.gc(&pipeline, Instant::now());
                    }
                }
                state.ready.store(pipeline.metadata_synced(), Ordering::Relaxed);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    // SIGTERM: stop answering ready, flush what the kernel holds, detach.
    state.ready.store(false, Ordering::Relaxed);
    let last = pipeline.final_batch().await;
    consume(last, &state, &tx, journal.as_ref());
    // The journal thread writes what it was sent, then ends with the channel.
    drop(journal);
    let _ = stop_http.send(());
    drop(tx);
    // Open event streams would hold a graceful shutdown forever: give them a moment, no more.
    if tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .is_err()
    {
        tracing::info!("closing open event streams");
    }
    drop(rings);
    drop(pipeline);
    tracing::info!("probes detached; bye");
    Ok(ExitCode::SUCCESS)
}

/// The journal in the state directory and the records it holds. A journal
/// that cannot be opened is logged and the agent runs on without it.
fn open_journal(cfg: &AgentConfig) -> (TerminationStore, Option<JournalWriter>) {
    let mut store = TerminationStore::new(RECORDS_KEPT);
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
                    tracing::warn!(
                        "cannot start the journal thread ({e}): termination records are kept in memory only"
                    );
                    (store, None)
                }
            }
        }
        Err(e) => {
            tracing::warn!("{e}: termination records are kept in memory only");
            (store, None)
        }
    }
}

/// Termination records kept in memory for the API (the journal keeps more on disk).
const RECORDS_KEPT: usize = 10_000;

/// One batch: attributed, counted, streamed.
async fn deliver(
    pipeline: &mut Pipeline,
    state: &AppState,
    tx: &broadcast::Sender<Arc<crate::events::Event>>,
    journal: Option<&JournalWriter>,
) {
    let batch = pipeline.next_batch().await;
    consume(batch, state, tx, journal);
}

fn consume(
    batch: Vec<crate::events::Event>,
    state: &AppState,
    tx: &broadcast::Sender<Arc<crate::events::Event>>,
    journal: Option<&JournalWriter>,
) {
    if batch.is_empty() {
        return;
    }
    let now = Instant::now();
    if let Ok(mut m) = state.metrics.lock() {
        for e in &batch {
            m.observe(e, now);
        }
    }
    for e in &batch {
        match e {
            crate::events::Event::Termination(t) => {
                if let Some(j) = journal {
                    j.write((**t).clone());
                }
                if let Ok(mut s) = state.terminations.lock() {
                    s.add((**t).clone());
                }
            }
            crate::events::Event::BackgroundDeath(d) => {
                if let Ok(mut s) = state.terminations.lock() {
                    s.add_death(d.clone());
                }
            }
            _ => {}
        }
    }
    if tx.receiver_count() > 0 {
        for e in batch {
            let _ = tx.send(Arc::new(e));
        }
    }
}
