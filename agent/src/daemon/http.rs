//! The agent's HTTP surface: `/metrics`, `/healthz`, `/readyz`, and
//! `/api/v1/events` (NDJSON, the schema of `trace -o json`, filtered by the
//! same `namespace`, `pod`, `container` query parameters).

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
    events::{Event, Filter},
    forensics::store::TerminationStore,
    metrics::{Metrics, to_prometheus_text},
};

pub struct AppState {
    pub metrics: Mutex<Metrics>,
    /// Probes attached and names synced from CRI.
    pub ready: AtomicBool,
    pub events: broadcast::Sender<Arc<Event>>,
    /// Events a slow stream reader missed.
    pub stream_dropped: Counter,
    pub terminations: Mutex<TerminationStore>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/events", get(events))
        .route("/api/v1/terminations", get(terminations))
        .with_state(state)
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

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: probes attaching or CRI not yet answered\n",
        )
            .into_response()
    }
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

/// Termination records (and background deaths) of the pods the filter
/// selects, oldest first; survives agent restarts (the journal).
async fn terminations(State(s): State<Arc<AppState>>, q: FilterQuery) -> Response {
    let filter = match filter_of(q) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let body = match s.terminations.lock() {
        Ok(store) => serde_json::to_string(&store.query(&filter)).unwrap_or_default(),
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "records unavailable\n").into_response();
        }
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn events(State(s): State<Arc<AppState>>, q: FilterQuery) -> Response {
    let filter = match filter_of(q) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let rx = s.events.subscribe();
    let stream = futures_util::stream::unfold((rx, filter, s), |(mut rx, filter, s)| async move {
        loop {
            match rx.recv().await {
                Ok(ev) if filter.matches(ev.pod()) => {
                    let mut line = ev.to_json();
                    line.push('\n');
                    return Some((Ok::<_, Infallible>(Bytes::from(line)), (rx, filter, s)));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    s.stream_dropped.inc_by(n);
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
