//! The agent's HTTP surface: `/metrics`, `/healthz`, `/readyz`, and the
//! node-wide API: `/api/v1/events` (NDJSON, the schema of `trace -o json`,
//! filtered by the same `namespace`, `pod`, `container` query parameters)
//! and `/api/v1/terminations` (paged with `limit` and `since`, streamed).
//!
//! Two routers: [`metrics_router`] for the metrics listener (`--listen`,
//! where Prometheus and the kubelet reach it), which answers the API's paths
//! with 404 and a sentence naming the socket; and [`router`], everything,
//! for the API's unix socket (root on the node) and `--api-listen` (TLS and
//! authentication).
//!
//! Every handler answers from memory: a lock is held only to copy out what
//! is needed, never across I/O, and never by the drain thread.

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::broadcast;

use crate::{
    deps::Health,
    driver::DriverLink,
    events::Filter,
    forensics::store::TerminationStore,
    metrics::{Metrics, to_prometheus_text},
};

pub struct AppState {
    pub metrics: Mutex<Metrics>,
    /// Probes attached and names synced from CRI.
    pub ready: AtomicBool,
    pub driver: DriverLink,
    /// Events a slow stream reader missed.
    pub stream_dropped: Counter,
    pub terminations: Mutex<TerminationStore>,
    pub health: Arc<Health>,
    /// Open `/api/v1/events` streams at most: beyond, 503.
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// Most `/api/v1/events` readers at once.
pub const MAX_STREAMS: usize = 64;

/// Everything: the API's socket and `--api-listen`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/events", get(events))
        .route("/api/v1/terminations", get(terminations))
        .with_state(state)
}

/// The metrics listener: `/metrics`, `/healthz`, `/readyz`; the node-wide
/// API is not there, and asking for it says where it is.
pub fn metrics_router(state: Arc<AppState>, api_socket: &std::path::Path) -> Router {
    let flag = if api_socket == std::path::Path::new(super::config::DEFAULT_API_SOCKET) {
        String::new()
    } else {
        format!(" --agent {}", api_socket.display())
    };
    let not_here: Arc<str> = format!(
        "the node-wide API is not served here: on the node, as root, use the agent's unix socket {0} (podscope why NAMESPACE/POD{flag}, or curl --unix-socket {0} http://localhost/api/v1/…), or start the agent with --api-listen and authentication\n",
        api_socket.display()
    )
    .into();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(move |uri: axum::http::Uri| {
            let not_here = not_here.clone();
            async move {
                if is_api(uri.path()) {
                    (StatusCode::NOT_FOUND, not_here.to_string())
                } else {
                    (StatusCode::NOT_FOUND, "not found\n".to_string())
                }
            }
        })
        .with_state(state)
}

/// A path of the node-wide API (any version, anything under it).
fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// OpenMetrics for clients that ask for it (Prometheus does), the classic
/// text format otherwise.
async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let body = match s.metrics.lock() {
        Ok(m) => m.render(),
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response();
        }
    };
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_prometheus_text(&body),
        )
            .into_response()
    }
}

/// 200 once the probes are attached and CRI has been asked; the body says
/// which dependency is degraded, since when and what that costs. A degraded
/// dependency does not make the agent unready: unready, a DaemonSet's pod
/// leaves its Service and Prometheus could no longer scrape the very
/// metrics that show the degradation.
async fn readyz(
    State(s): State<Arc<AppState>>,
    q: Result<Query<ReadyQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let ready = s.ready.load(Ordering::Relaxed);
    if q.is_ok_and(|Query(q)| q.format.as_deref() == Some("json")) {
        // For doctor and scripts: always 200, the state in the body.
        let body = serde_json::json!({
            "ready": ready,
            "dependencies": s.health.report(),
        });
        return (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    let mut body = String::from(if ready {
        "ready\n"
    } else {
        "not ready: probes attaching or CRI not yet answered\n"
    });
    for d in s.health.report() {
        let mark = match d.state {
            "degraded" => '-',
            _ => '+',
        };
        body.push_str(&format!("[{mark}]{} {}", d.dependency.name(), d.state));
        if let (Some(reason), Some(since)) = (&d.reason, d.since) {
            body.push_str(&format!(
                " since {}: {reason}; without it, {}",
                humantime::format_rfc3339_seconds(since),
                d.feature
            ));
        }
        body.push('\n');
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct ReadyQuery {
    /// `json`: the readiness and every dependency's state as JSON.
    pub format: Option<String>,
}

type FilterQuery = Result<Query<Filter>, axum::extract::rejection::QueryRejection>;

fn filter_of(q: FilterQuery) -> Result<Filter, (StatusCode, String)> {
    q.map(|Query(f)| f).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("{e}; the parameters are namespace, pod, container\n"),
        )
    })
}

/// `/api/v1/terminations`' query: the filter, and the page.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminationQuery {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    /// Most records of each list (the newest), at most [`MAX_PAGE`].
    pub limit: Option<usize>,
    /// Only what ended after this time (RFC 3339).
    pub since: Option<String>,
}

/// The largest page of `/api/v1/terminations`.
pub const MAX_PAGE: usize = 1000;

/// Termination records (and background deaths) of the pods the filter
/// selects, oldest first; survives agent restarts (the journal). Records
/// are copied out under the lock and serialized one by one into the body.
async fn terminations(
    State(s): State<Arc<AppState>>,
    q: Result<Query<TerminationQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("{e}; the parameters are namespace, pod, container, limit, since\n"),
            )
                .into_response();
        }
    };
    let since = match q.since.as_deref().map(humantime::parse_rfc3339_weak) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("since: {e} (an RFC 3339 time such as 2026-11-30T12:00:00Z)\n"),
            )
                .into_response();
        }
    };
    let limit = q.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE);
    let filter = Filter {
        namespace: q.namespace,
        pod: q.pod,
        container: q.container,
    };
    let (records, deaths, respawns) = match s.terminations.lock() {
        Ok(store) => {
            let (records, deaths) = store.page(&filter, since, limit);
            (records, deaths, store.respawns(&filter))
        }
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "records unavailable\n").into_response();
        }
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(page_stream(records, deaths, respawns)),
    )
        .into_response()
}

/// `{"terminations": [...], "background_deaths": [...], "respawns": [...]}`,
/// one chunk per item.
fn page_stream<
    R: serde::Serialize + Send + 'static,
    D: serde::Serialize + Send + 'static,
    S: serde::Serialize + Send + 'static,
>(
    records: Vec<R>,
    deaths: Vec<D>,
    respawns: Vec<S>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    fn items<T: serde::Serialize>(v: Vec<T>) -> impl Iterator<Item = Bytes> {
        v.into_iter().enumerate().map(|(i, x)| {
            let mut b = if i == 0 { vec![] } else { vec![b','] };
            // Records are plain data: serialization cannot fail.
            let _ = serde_json::to_writer(&mut b, &x);
            Bytes::from(b)
        })
    }
    let chunks = std::iter::once(Bytes::from_static(b"{\"terminations\":["))
        .chain(items(records))
        .chain(std::iter::once(Bytes::from_static(
            b"],\"background_deaths\":[",
        )))
        .chain(items(deaths))
        .chain(std::iter::once(Bytes::from_static(b"],\"respawns\":[")))
        .chain(items(respawns))
        .chain(std::iter::once(Bytes::from_static(b"]}")));
    futures_util::stream::iter(chunks.map(Ok))
}

/// One `/api/v1/events` reader. When it goes (the client left, or stopped
/// reading and was disconnected), what it had not taken yet is counted as
/// missed too.
struct StreamReader {
    rx: broadcast::Receiver<Arc<crate::driver::Published>>,
    filter: Filter,
    state: Arc<AppState>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.state.stream_dropped.inc_by(self.rx.len() as u64);
    }
}

/// Newest events as they come; a reader that falls behind loses the oldest
/// (counted in `podscope_stream_events_dropped_total`), never slows the
/// drain or the other readers; each event is serialized once for all.
async fn events(State(s): State<Arc<AppState>>, q: FilterQuery) -> Response {
    let filter = match filter_of(q) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let Ok(slot) = s.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many open event streams (at most {MAX_STREAMS})\n"),
        )
            .into_response();
    };
    let reader = StreamReader {
        rx: s.driver.subscribe(),
        filter,
        state: s,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        loop {
            match r.rx.recv().await {
                Ok(ev) if r.filter.matches(ev.event.pod()) => {
                    let line = ev.json_line().clone();
                    return Some((Ok::<_, Infallible>(line), r));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    r.state.stream_dropped.inc_by(n);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn state() -> Arc<AppState> {
        let metrics = Metrics::new(&crate::metrics::MetricsOptions {
            budget: crate::metrics::SeriesBudget::new(100),
            series_retention: std::time::Duration::from_secs(60),
            node_name: "test".into(),
        });
        Arc::new(AppState {
            stream_dropped: metrics.stream_dropped.clone(),
            metrics: Mutex::new(metrics),
            ready: AtomicBool::new(true),
            driver: DriverLink::detached(),
            terminations: Mutex::new(TerminationStore::new(
                crate::forensics::store::StoreLimits {
                    records: 10,
                    bytes: 1 << 20,
                },
            )),
            health: Arc::new(Health::new()),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        })
    }

    async fn get(r: Router, path: &str) -> (StatusCode, String) {
        let req = axum::http::Request::get(path).body(Body::empty()).unwrap();
        let Ok(resp) = r.oneshot(req).await;
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_metrics_listener_serves_no_node_wide_data_and_says_where_it_is() {
        let sock = std::path::Path::new("/run/podscope/api.sock");
        let m = || metrics_router(state(), sock);
        for path in [
            "/api/v1/events",
            "/api/v1/terminations",
            "/api/v1/terminations?namespace=a&pod=b",
            "/api/v2/anything",
            "/api",
        ] {
            let (status, body) = get(m(), path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert!(
                body.contains("/run/podscope/api.sock") && body.trim().lines().count() == 1,
                "{path}: {body}"
            );
        }
        assert_eq!(get(m(), "/nothing").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(m(), "/metrics").await.0, StatusCode::OK);
        assert_eq!(get(m(), "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(m(), "/readyz").await.0, StatusCode::OK);
        // The socket's router has it all.
        let (status, body) = get(router(state()), "/api/v1/terminations").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"terminations":[],"background_deaths":[],"respawns":[]}"#
        );
    }
}
