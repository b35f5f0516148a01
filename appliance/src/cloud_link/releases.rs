//! Releases the cloud asks this depot to hold: each desired `release` object is staged from the
//! cloud's image repository through the normal verification path (metadata from the pinned
//! fleet root, the signed chunk index, the whole-image hash), fetching only the chunks the
//! store lacks. Runs on the stored desired state, so it goes on after a restart and retries
//! with backoff; what it did is reported back as `release` objects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use url::Url;

use atlasmesh_cloud_sync::client::Credentials;
use atlasmesh_cloud_sync::desired::{Spec, release_key};

use crate::ota::{Actor, Ota, OtaError, Source};
use crate::store::{Store, StoreError};

use super::db;

const RETRY_MIN: Duration = Duration::from_secs(15);
const RETRY_MAX: Duration = Duration::from_secs(600);

/// How one release stands at this depot, as reported to the cloud.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReleaseState {
    pub hardware_id: String,
    pub version: String,
    pub sha256: String,
    /// staging, staged, failed
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: u32,
    #[serde(skip)]
    pub generation: u64,
    #[serde(skip)]
    retry_at: Option<tokio::time::Instant>,
}

pub struct Releases {
    ota: Arc<Ota>,
    store: Store,
    states: Mutex<HashMap<String, ReleaseState>>,
    creds: Mutex<Option<Credentials>>,
    wake: Notify,
    /// The director certificate from the cloud's last welcome, until it is installed (it
    /// needs the certifier key, which arrives with the first staged release).
    pending_certificate: Mutex<Option<Vec<u8>>>,
    depot_id: String,
}

/// A client for the cloud's repository routes, with the depot's certificate and only the
/// fleet CA as a root.
pub fn repository_client(creds: &Credentials) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(
            creds.ca_certificate_pem.as_bytes(),
        )?)
        .identity(reqwest::Identity::from_pem(
            format!("{}\n{}", creds.certificate_pem, creds.key_pem).as_bytes(),
        )?)
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .build()
}

impl Releases {
    pub fn new(ota: Arc<Ota>, store: Store, depot_id: String) -> Arc<Self> {
        Arc::new(Self {
            ota,
            store,
            states: Mutex::default(),
            creds: Mutex::default(),
            wake: Notify::new(),
            pending_certificate: Mutex::default(),
            depot_id,
        })
    }

    /// What the cloud's welcome carried: pins the fleet root if the depot has none, and
    /// installs the director certificate when the depot's is missing, for another root, or
    /// within 30 days of expiry.
    pub async fn welcomed(&self, fleet_root: Vec<u8>, certificate: Vec<u8>) {
        let actor = cloud_actor();
        if !fleet_root.is_empty() && !self.ota.has_fleet_root() {
            match self.ota.pin_fleet_root(&fleet_root, &actor).await {
                Ok(()) => {
                    tracing::info!("pinned the fleet root the cloud holds (the depot had none)")
                }
                Err(e) => tracing::error!(error = %e, "the cloud's fleet root cannot be pinned"),
            }
        }
        if !certificate.is_empty() && self.needs_certificate() {
            *self
                .pending_certificate
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(certificate);
            self.install_pending().await;
        }
    }

    fn needs_certificate(&self) -> bool {
        use sha2::{Digest, Sha256};
        let Some(current) = self.ota.certificate() else {
            return true;
        };
        let root = hex::encode(Sha256::digest(self.ota.director_root_v1()));
        let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(30 * 24);
        current.signed.director_root_sha256 != root
            || current.signed.depot_id != self.depot_id
            || current
                .signed
                .expires
                .parse::<jiff::Timestamp>()
                .map_or(true, |t| t <= soon)
    }

    async fn install_pending(&self) {
        let Some(cert) = self
            .pending_certificate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        match self
            .ota
            .install_certificate(&cert, &self.depot_id, &cloud_actor())
            .await
        {
            Ok(_) => {
                tracing::info!("installed the director certificate the cloud issued");
                *self
                    .pending_certificate
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
            }
            // Needs the certifier key from a first staged release: kept for later.
            Err(OtaError::Conflict(_)) => {}
            Err(e) => {
                tracing::error!(error = %e, "the cloud's director certificate does not verify");
                *self
                    .pending_certificate
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
    }

    pub fn set_credentials(&self, creds: &Credentials) {
        *self.creds.lock().unwrap_or_else(|p| p.into_inner()) = Some(creds.clone());
    }

    /// Look again now (a new desired revision was stored).
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    pub fn states(&self) -> Vec<ReleaseState> {
        let mut out: Vec<_> = self
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.hardware_id, &a.version).cmp(&(&b.hardware_id, &b.version)));
        out
    }

    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.reconcile(&shutdown).await {
                    tracing::error!(error = %e, "cannot read the desired releases");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = this.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    async fn reconcile(&self, shutdown: &CancellationToken) -> Result<(), StoreError> {
        self.install_pending().await;
        let (desired, images) = self
            .store
            .read(|c| Ok::<_, StoreError>((db::desired(c)?, crate::ota::db::images(c, false)?)))
            .await?;
        let wanted: Vec<(u64, String, String, String)> = desired
            .into_iter()
            .filter_map(|d| match d.spec {
                Spec::Release {
                    hardware_id,
                    version,
                    sha256,
                } => Some((d.generation.max(0) as u64, hardware_id, version, sha256)),
                _ => None,
            })
            .collect();
        {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            states.retain(|k, _| wanted.iter().any(|(_, h, v, _)| release_key(h, v) == *k));
        }
        self.ota
            .discard_cloud_partials(&wanted.iter().map(|w| w.3.clone()).collect::<Vec<_>>());
        for (generation, hardware, version, sha256) in wanted {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let key = release_key(&hardware, &version);
            let staged = images.iter().any(|i| {
                i.hardware_id == hardware && i.version == version && i.corrupt_at.is_none()
            });
            let mut state = {
                let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
                states.get(&key).cloned()
            }
            .unwrap_or(ReleaseState {
                hardware_id: hardware.clone(),
                version: version.clone(),
                sha256: sha256.clone(),
                state: "staging",
                error: None,
                attempts: 0,
                generation,
                retry_at: None,
            });
            state.generation = generation;
            if staged {
                if state.state != "staged" {
                    state.state = "staged";
                    state.error = None;
                    self.put(&key, state);
                }
                continue;
            }
            if state
                .retry_at
                .is_some_and(|t| t > tokio::time::Instant::now())
            {
                continue;
            }
            let creds = self.creds.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let Some(creds) = creds else { continue };
            let source = match Url::parse(&format!(
                "{}/repository/",
                creds.cloud_url.trim_end_matches('/')
            )) {
                Ok(base) => match repository_client(&creds) {
                    Ok(client) => Source::Cloud { base, client },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the repository client from the depot's credentials");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "the cloud URL does not make a repository URL");
                    continue;
                }
            };
            state.state = "staging";
            state.attempts += 1;
            self.put(&key, state.clone());
            tracing::info!(hardware = %hardware, version = %version, attempt = state.attempts, "staging a release the cloud asked for");
            let actor = cloud_actor();
            let result = self
                .ota
                .stage_now(source, hardware.clone(), version.clone(), actor)
                .await;
            match result {
                Ok(_) => {
                    state.state = "staged";
                    state.error = None;
                    state.retry_at = None;
                    // The release brought the certifier key a waiting certificate needs.
                    self.install_pending().await;
                }
                Err(OtaError::Busy(_)) => {
                    // A technician's job holds the stager; not an attempt of ours.
                    state.attempts -= 1;
                    state.state = "staging";
                    state.retry_at = Some(tokio::time::Instant::now() + RETRY_MIN);
                }
                Err(e) => {
                    let wait = RETRY_MIN
                        .saturating_mul(
                            2u32.saturating_pow(state.attempts.saturating_sub(1).min(6)),
                        )
                        .min(RETRY_MAX);
                    tracing::warn!(hardware = %hardware, version = %version, error = %e, retry_in_s = wait.as_secs(), "staging a cloud release failed");
                    state.state = "failed";
                    state.error = Some(e.to_string());
                    state.retry_at = Some(tokio::time::Instant::now() + wait);
                }
            }
            self.put(&key, state);
        }
        Ok(())
    }

    fn put(&self, key: &str, state: ReleaseState) {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), state);
    }
}

fn cloud_actor() -> Actor {
    Actor {
        name: "cloud".into(),
        role: None,
        request_id: None,
    }
}
