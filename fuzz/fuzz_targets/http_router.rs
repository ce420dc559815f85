//! The agent's HTTP routers over arbitrary paths, queries and Accept
//! headers: every request gets an answer (a 4xx for nonsense), never a
//! panic. The event stream is only opened (it never ends by itself). The
//! metrics listener's router never answers a node-wide path with data.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use axum::{body::Body, http::Request};
use libfuzzer_sys::fuzz_target;
use podscope::{
    daemon::http::{AppState, MAX_STREAMS, metrics_router, router},
    deps::Health,
    driver::DriverLink,
    forensics::store::TerminationStore,
    metrics::{Metrics, MetricsOptions, SeriesBudget},
};
use tower::ServiceExt;

fn state() -> Arc<AppState> {
    static STATE: OnceLock<Arc<AppState>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let metrics = Metrics::new(&MetricsOptions {
                budget: SeriesBudget::new(100),
                series_retention: std::time::Duration::from_secs(60),
                node_name: "fuzz".into(),
            });
            let stream_dropped = metrics.stream_dropped.clone();
            Arc::new(AppState {
                metrics: Mutex::new(metrics),
                // Ready, so that a 5xx is always a bug (/readyz answers 503
                // by design while the agent starts).
                ready: std::sync::atomic::AtomicBool::new(true),
                driver: DriverLink::detached(),
                stream_dropped,
                terminations: Mutex::new(TerminationStore::new(Default::default())),
                health: Arc::new(Health::new()),
                streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            })
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (target, accept) = text.split_once('\n').unwrap_or((&text, "*/*"));
    let Ok(req) = Request::get(target)
        .header("accept", accept)
        .body(Body::empty())
    else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let metrics_req = Request::get(target)
        .header("accept", accept)
        .body(Body::empty())
        .ok();
    rt.block_on(async {
        let Ok(resp) = router(state()).oneshot(req).await;
        let status = resp.status();
        assert!(!status.is_server_error(), "{target:?}: {status}");
        if !target.starts_with("/api/v1/events") {
            let _ = axum::body::to_bytes(resp.into_body(), 1 << 20).await;
        }
        let Some(req) = metrics_req else { return };
        let path = req.uri().path().to_string();
        let Ok(resp) = metrics_router(state(), std::path::Path::new("/run/podscope/api.sock"))
            .oneshot(req)
            .await;
        let status = resp.status();
        assert!(!status.is_server_error(), "{target:?}: {status}");
        let served = matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz");
        assert!(
            served || !status.is_success(),
            "the metrics listener answered {target:?} with {status}"
        );
    });
});
