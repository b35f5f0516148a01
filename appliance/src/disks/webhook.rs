//! Delivers disk alerts to the configured webhook: JSON POSTs, retried with backoff until the
//! receiver answers 2xx. The delivery state is in the store, so a restart keeps retrying and
//! nothing is sent twice once acknowledged.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::db;
use crate::http::Clock;
use crate::store::{Store, unix_ms};

pub async fn deliver(
    url: String,
    depot_id: String,
    store: Store,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the disk alert webhook client");
            return;
        }
    };
    loop {
        let now = unix_ms(clock.now());
        let (due, next) = match store.read(move |c| db::due_alerts(c, now)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "could not read pending disk alerts");
                (Vec::new(), Some(now + 10_000))
            }
        };
        for alert in &due {
            let body = json!({
                "depot_id": depot_id,
                "kind": "disk_verdict_changed",
                "alert": alert,
            });
            let result = client
                .post(&url)
                .json(&body)
                .send()
                .await
                .and_then(|r| r.error_for_status());
            let id = alert.id;
            let attempts = alert.attempts + 1;
            let outcome = match result {
                Ok(_) => {
                    tracing::info!(alert = id, url = %url, "disk alert delivered to the webhook");
                    store.write(move |tx| db::delivered(tx, id)).await
                }
                Err(e) => {
                    let wait = backoff(attempts);
                    let error = e.to_string();
                    tracing::warn!(alert = id, url = %url, attempts, retry_in = ?wait, error = %error, "disk alert webhook failed");
                    let next = unix_ms(clock.now()) + wait.as_millis() as i64;
                    store
                        .write(move |tx| db::delivery_failed(tx, id, &error, next))
                        .await
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(alert = id, error = %e, "could not record a webhook delivery");
            }
        }
        if !due.is_empty() {
            continue;
        }
        let sleep = next
            .map(|at| Duration::from_millis((at - unix_ms(clock.now())).clamp(0, 3_600_000) as u64))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Backoff between attempts: 2 s doubling to an hour.
fn backoff(attempts: i64) -> Duration {
    Duration::from_secs(2u64.saturating_pow(attempts.clamp(1, 12) as u32).min(3600))
}
