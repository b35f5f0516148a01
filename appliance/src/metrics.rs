//! Prometheus metrics through `prometheus-client`. Each subsystem registers its metrics into
//! one [`Registry`] while the mode is wired; `/metrics` encodes it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route template (`/api/v1/users/{username}`), never the raw path, so label values
    /// stay bounded whatever clients send.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub result: String,
}

/// Metrics of the HTTP server and of the things every mode does (sign-ins, audit, process).
#[derive(Clone)]
pub struct CoreMetrics {
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram>,
    pub http_in_flight: Gauge,
    pub login_failures: Counter,
    pub audit_records: Family<OutcomeLabels, Counter>,
    pub process_rss: Gauge,
}

impl CoreMetrics {
    pub fn register(registry: &mut Registry, mode: &str) -> Self {
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                mode: mode.into(),
            })
            .set(1);
        registry.register(
            "atlasmesh_build_info",
            "Build and mode of this process (always 1)",
            build_info,
        );

        let start = Gauge::<i64>::default();
        start.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
                .unwrap_or(0),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            start,
        );

        let process_rss = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            process_rss.clone(),
        );

        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "atlasmesh_http_requests",
            "HTTP requests by method, route and status",
            http_requests.clone(),
        );

        // 1 ms to about 33 s: from cached reads to slow uploads.
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "atlasmesh_http_request_duration_seconds",
            "Time from request to response headers",
            http_duration.clone(),
        );

        let http_in_flight = Gauge::default();
        registry.register(
            "atlasmesh_http_requests_in_flight",
            "HTTP requests being handled now",
            http_in_flight.clone(),
        );

        let login_failures = Counter::default();
        registry.register(
            "atlasmesh_login_failures",
            "Failed panel sign-ins",
            login_failures.clone(),
        );

        let audit_records = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "atlasmesh_audit_records",
            "Audit records written, by result",
            audit_records.clone(),
        );

        Self {
            http_requests,
            http_duration,
            http_in_flight,
            login_failures,
            audit_records,
            process_rss,
        }
    }
}

/// The registry in Prometheus' OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}
