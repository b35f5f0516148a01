//! The depot's side of the link: enrolment (with the CA pinned by the token), renewal, and the
//! sync session loop that runs for as long as the depot does, reconnecting with backoff.
//!
//! The depot's store stays the depot's: the loop reads and writes it only through
//! [`DepotSide`], which the appliance implements over its own store.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::desired::DesiredRevision;
use crate::pb::{self, cloud_message, depot_message};
use crate::pki;
use crate::server::Clock;
use crate::token::EnrollToken;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cloud URL {0:?}: {1}")]
    BadUrl(String, String),
    #[error("enrolment token: {0}")]
    BadToken(String),
    #[error("cannot reach the cloud: {}", chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("the cloud answered {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("the cloud broke the protocol: {0}")]
    Protocol(String),
    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("the depot's store: {0}")]
    Side(String),
}

/// An error with its causes: tonic's transport error says only "transport error" itself.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        // A connection that failed under a call shows as an Unavailable status whose source
        // holds the reason.
        let message = match std::error::Error::source(&s) {
            Some(cause) if s.message().is_empty() || s.message() == "transport error" => {
                chain(cause)
            }
            _ => s.message().to_owned(),
        };
        ClientError::Rpc {
            code: s.code(),
            message,
        }
    }
}

/// What a depot keeps after enrolment (the key is secret: the caller stores it 0600).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub cloud_url: String,
    pub depot_id: String,
    pub depot_name: String,
    pub certificate_pem: String,
    pub key_pem: String,
    pub ca_certificate_pem: String,
    pub not_after_ms: i64,
    /// When the certificate was issued (Unix ms, the depot's clock).
    pub issued_ms: i64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cloud_url", &self.cloud_url)
            .field("depot_id", &self.depot_id)
            .field("depot_name", &self.depot_name)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Renew after two thirds of the certificate's life, as ACME clients do.
    pub fn renew_at_ms(&self) -> i64 {
        self.issued_ms + (self.not_after_ms - self.issued_ms) * 2 / 3
    }
}

fn endpoint(url: &str) -> Result<(Endpoint, String), ClientError> {
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::BadUrl(url.into(), e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(ClientError::BadUrl(
            url.into(),
            "the cloud is reached over TLS: use https://HOST:PORT".into(),
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| ClientError::BadUrl(url.into(), "no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::BadUrl(url.into(), e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok((endpoint, host))
}

/// Enrols: connects trusting only a CA whose certificate hashes to the token's pin, sends the
/// token and a CSR for a fresh key, and returns what to keep.
pub async fn enroll(
    cloud_url: &str,
    token: &str,
    software_version: &str,
    clock: &Clock,
) -> Result<Credentials, ClientError> {
    let token = EnrollToken::parse(token).map_err(ClientError::BadToken)?;
    let (endpoint, host) = endpoint(cloud_url)?;
    let verifier = Arc::new(PinnedCa {
        fingerprint: token.ca_fingerprint().to_owned(),
    });
    let channel = endpoint
        .tls_config_with_verifier(ClientTlsConfig::new().domain_name(host), verifier)?
        .connect()
        .await?;
    let (key_pem, csr_pem) = pki::depot_key_and_csr("atlasmesh depot")?;
    let issued_ms = clock();
    let response = pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: token.to_string(),
            csr_pem,
            software_version: software_version.to_owned(),
        })
        .await?
        .into_inner();
    let ca_der = pki::first_der(&response.ca_certificate_pem)?;
    if pki::fingerprint(&ca_der) != token.ca_fingerprint() {
        return Err(ClientError::Protocol(
            "the CA the cloud returned is not the one the token pins".into(),
        ));
    }
    Ok(Credentials {
        cloud_url: cloud_url.to_owned(),
        depot_id: response.depot_id,
        depot_name: response.depot_name,
        certificate_pem: response.certificate_pem,
        key_pem,
        ca_certificate_pem: response.ca_certificate_pem,
        not_after_ms: response.not_after_unix_ms,
        issued_ms,
    })
}

/// A mutual-TLS channel to the cloud with the depot's credentials.
pub async fn connect(creds: &Credentials) -> Result<Channel, ClientError> {
    let (endpoint, host) = endpoint(&creds.cloud_url)?;
    let tls = ClientTlsConfig::new()
        .domain_name(host)
        .ca_certificate(Certificate::from_pem(&creds.ca_certificate_pem))
        .identity(Identity::from_pem(&creds.certificate_pem, &creds.key_pem));
    Ok(endpoint.tls_config(tls)?.connect().await?)
}

/// Renews the depot's certificate for a fresh key.
pub async fn renew(creds: &Credentials, clock: &Clock) -> Result<Credentials, ClientError> {
    let channel = connect(creds).await?;
    let (key_pem, csr_pem) = pki::depot_key_and_csr("atlasmesh depot")?;
    let issued_ms = clock();
    let response = pb::enrollment_client::EnrollmentClient::new(channel)
        .renew(pb::RenewRequest { csr_pem })
        .await?
        .into_inner();
    Ok(Credentials {
        certificate_pem: response.certificate_pem,
        key_pem,
        not_after_ms: response.not_after_unix_ms,
        issued_ms,
        ..creds.clone()
    })
}

/// Trusts exactly the CA whose certificate (sent by the server after its own) has the pinned
/// SHA-256, and then verifies the server's certificate against it as usual.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
}

impl PinnedCa {
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the cloud's certificate does not chain to the CA the enrolment token pins"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Self::provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &Self::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &Self::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An event from the depot's outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    pub sequence: u64,
    pub id: String,
    pub at_ms: i64,
    pub kind: String,
    pub json: String,
}

/// One reported object: the depot's current view of something.
#[derive(Clone, Debug, PartialEq)]
pub struct Reported {
    pub kind: String,
    pub key: String,
    pub observed_generation: u64,
    pub json: String,
}

/// The outbox's state, for the hello and the panel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Oldest unacknowledged sequence, 0 when empty.
    pub oldest: u64,
    pub pending: u64,
    pub dropped_total: u64,
}

/// How the link stands, for the panel and metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum LinkState {
    Connecting,
    Online { since_ms: i64 },
    Offline { since_ms: i64, error: String },
}

/// What the sync loop needs from the depot. Every method is a short store operation.
pub trait DepotSide: Send + Sync + 'static {
    /// The newest desired revision stored.
    fn stored_revision(&self) -> impl Future<Output = Result<u64, String>> + Send;
    /// Stores a validated revision durably and applies it, all or nothing; an error refuses
    /// it (nothing stored, the depot keeps running on what it had).
    fn store_desired(
        &self,
        revision: DesiredRevision,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Events after `after`, oldest first, at most `max` and about `max_bytes`.
    fn outbox_after(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, String>> + Send;
    /// The cloud stored every event up to `sequence`: they may go.
    fn outbox_acked(&self, sequence: u64) -> impl Future<Output = Result<(), String>> + Send;
    fn outbox_status(&self) -> impl Future<Output = Result<OutboxStatus, String>> + Send;
    /// Every object the depot reports, now.
    fn reported(&self) -> impl Future<Output = Result<Vec<Reported>, String>> + Send;
    /// Keeps renewed credentials (atomically; the key 0600).
    fn save_credentials(
        &self,
        creds: &Credentials,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn link_state(&self, state: LinkState);
    /// The depot's id as vehicles know it and its director's first root, for the cloud to
    /// certify.
    fn identity(&self) -> impl Future<Output = (String, Vec<u8>)> + Send;
    /// The cloud's welcome carried the fleet root and the certificate of the director root
    /// (each empty when the cloud holds none); the depot adopts what it lacks.
    fn welcomed(
        &self,
        fleet_root: Vec<u8>,
        director_certificate: Vec<u8>,
    ) -> impl Future<Output = ()> + Send;
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub software_version: String,
    /// How often the outbox is looked at for new events.
    pub push_interval: Duration,
    /// How often reported state is compared and changes sent.
    pub report_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Events sent but not yet acknowledged, at most.
    pub max_in_flight: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            software_version: String::new(),
            push_interval: Duration::from_secs(1),
            report_interval: Duration::from_secs(5),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_in_flight: 2_000,
        }
    }
}

const BATCH_EVENTS: usize = 500;
/// Well under tonic's 4 MiB message limit.
const BATCH_BYTES: usize = 1 << 20;

/// Runs the link until `shutdown`: connect, sync, and on any failure back off (with jitter)
/// and start again; renews the certificate when due.
pub async fn run<S: DepotSide>(
    side: Arc<S>,
    mut creds: Credentials,
    options: ClientOptions,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let mut backoff = options.backoff_min;
    // When to renew next: two thirds into the certificate's life, or a minute after a failed
    // attempt, so a cloud that cannot renew does not hold the link in a renewal loop.
    let mut renew_at = creds.renew_at_ms();
    while !shutdown.is_cancelled() {
        side.link_state(LinkState::Connecting);
        let started = tokio::time::Instant::now();
        if clock() >= renew_at {
            match renew(&creds, &clock).await {
                Ok(renewed) => match side.save_credentials(&renewed).await {
                    Ok(()) => {
                        tracing::info!(
                            not_after_ms = renewed.not_after_ms,
                            "depot certificate renewed"
                        );
                        creds = renewed;
                        renew_at = creds.renew_at_ms();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot keep the renewed certificate");
                        renew_at = clock() + 60_000;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "certificate renewal failed; will retry");
                    renew_at = clock() + 60_000;
                }
            }
        }
        let result = session(&side, &creds, &options, &clock, renew_at, &shutdown).await;
        if shutdown.is_cancelled() {
            break;
        }
        let error = match result {
            // Due for renewal: straight back round.
            Ok(()) => continue,
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(30) {
            backoff = options.backoff_min;
        }
        side.link_state(LinkState::Offline {
            since_ms: clock(),
            error: error.clone(),
        });
        // Full jitter keeps a fleet of depots from reconnecting in step after an outage.
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "cloud link down");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(options.backoff_max);
    }
}

/// One session; `Ok` when it ended to renew the certificate or on shutdown.
async fn session<S: DepotSide>(
    side: &Arc<S>,
    creds: &Credentials,
    options: &ClientOptions,
    clock: &Clock,
    renew_at: i64,
    shutdown: &CancellationToken,
) -> Result<(), ClientError> {
    let channel = connect(creds).await?;
    let mut client = pb::depot_sync_client::DepotSyncClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::DepotMessage>(16);
    let send = |body: depot_message::Body| {
        let tx = tx.clone();
        async move {
            tx.send(pb::DepotMessage { body: Some(body) })
                .await
                .map_err(|_| ClientError::Protocol("the session's stream closed".into()))
        }
    };
    let status = side.outbox_status().await.map_err(ClientError::Side)?;
    let (local_id, director_root) = side.identity().await;
    send(depot_message::Body::Hello(pb::Hello {
        local_id,
        director_root,
        desired_revision: side.stored_revision().await.map_err(ClientError::Side)?,
        software_version: options.software_version.clone(),
        outbox_oldest_sequence: status.oldest,
        outbox_dropped_total: status.dropped_total,
    }))
    .await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
        Err(_) => return Err(ClientError::Protocol("no welcome within 30 s".into())),
        Ok(m) => m?.and_then(|m| m.body),
    };
    let Some(cloud_message::Body::Welcome(welcome)) = welcome else {
        return Err(ClientError::Protocol(
            "the session did not start with a welcome".into(),
        ));
    };
    side.outbox_acked(welcome.events_acked)
        .await
        .map_err(ClientError::Side)?;
    side.welcomed(welcome.fleet_root, welcome.director_certificate)
        .await;
    tracing::info!(depot = %welcome.depot_name, events_acked = welcome.events_acked, "cloud link up");
    side.link_state(LinkState::Online { since_ms: clock() });

    let mut acked = welcome.events_acked;
    let mut sent = acked.max(status.oldest.saturating_sub(1));
    let mut reported: HashMap<(String, String), [u8; 32]> = HashMap::new();
    let mut push = tokio::time::interval(options.push_interval);
    let mut report = tokio::time::interval(options.report_interval);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = inbound.message() => {
                let Some(message) = message? else {
                    return Err(ClientError::Protocol("the cloud ended the session".into()));
                };
                match message.body {
                    Some(cloud_message::Body::Desired(desired)) => {
                        let body = apply_desired(side.as_ref(), desired).await?;
                        send(body).await?;
                    }
                    Some(cloud_message::Body::EventsAck(ack)) => {
                        side.outbox_acked(ack.sequence).await.map_err(ClientError::Side)?;
                        let window_was_full = sent.saturating_sub(acked) >= options.max_in_flight;
                        acked = acked.max(ack.sequence);
                        // A backlog goes out as fast as the cloud acknowledges it, not one
                        // window per push tick (100,000 events would take 50 ticks).
                        if window_was_full {
                            sent = push_events(side.as_ref(), &send, sent, acked, options.max_in_flight).await?;
                        }
                    }
                    Some(cloud_message::Body::Welcome(_)) | None => {
                        return Err(ClientError::Protocol("unexpected message in a session".into()));
                    }
                }
            }
            _ = push.tick() => {
                if clock() >= renew_at {
                    return Ok(());
                }
                sent = push_events(side.as_ref(), &send, sent, acked, options.max_in_flight).await?;
            }
            _ = report.tick() => {
                push_reported(side.as_ref(), &send, &mut reported, clock()).await?;
            }
        }
    }
}

async fn apply_desired<S: DepotSide>(
    side: &S,
    desired: pb::DesiredState,
) -> Result<depot_message::Body, ClientError> {
    let revision = desired.revision;
    let stored = side.stored_revision().await.map_err(ClientError::Side)?;
    if revision <= stored {
        // Already held (a resend after a lost acknowledgement).
        return Ok(depot_message::Body::DesiredAck(pb::DesiredAck {
            revision: stored,
        }));
    }
    let refused = |reason: String| {
        tracing::warn!(revision, %reason, "desired state refused; keeping the last known one");
        depot_message::Body::DesiredRefused(pb::DesiredRefused { revision, reason })
    };
    let decoded = match DesiredRevision::from_wire(desired, stored) {
        Ok(d) => d,
        Err(reason) => return Ok(refused(reason)),
    };
    Ok(match side.store_desired(decoded).await {
        Ok(()) => {
            tracing::info!(revision, "desired state stored");
            depot_message::Body::DesiredAck(pb::DesiredAck { revision })
        }
        Err(reason) => refused(reason),
    })
}

async fn push_events<S: DepotSide, F, Fut>(
    side: &S,
    send: &F,
    sent: u64,
    acked: u64,
    max_in_flight: u64,
) -> Result<u64, ClientError>
where
    F: Fn(depot_message::Body) -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let mut sent = sent;
    while sent.saturating_sub(acked) < max_in_flight {
        let events = side
            .outbox_after(sent, BATCH_EVENTS, BATCH_BYTES)
            .await
            .map_err(ClientError::Side)?;
        let Some(last) = events.last().map(|e| e.sequence) else {
            break;
        };
        send(depot_message::Body::Events(pb::EventBatch {
            events: events
                .into_iter()
                .map(|e| pb::Event {
                    id: e.id,
                    sequence: e.sequence,
                    at_unix_ms: e.at_ms,
                    kind: e.kind,
                    json: e.json,
                })
                .collect(),
        }))
        .await?;
        sent = last;
    }
    Ok(sent)
}

async fn push_reported<S: DepotSide, F, Fut>(
    side: &S,
    send: &F,
    last: &mut HashMap<(String, String), [u8; 32]>,
    now_ms: i64,
) -> Result<(), ClientError>
where
    F: Fn(depot_message::Body) -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let current = side.reported().await.map_err(ClientError::Side)?;
    let mut changed = Vec::new();
    let mut seen = HashMap::with_capacity(current.len());
    for r in current {
        let digest: [u8; 32] = Sha256::new()
            .chain_update(r.json.as_bytes())
            .chain_update(r.observed_generation.to_be_bytes())
            .finalize()
            .into();
        let key = (r.kind.clone(), r.key.clone());
        if last.get(&key) != Some(&digest) {
            changed.push(pb::ReportedObject {
                kind: r.kind,
                key: r.key,
                observed_generation: r.observed_generation,
                observed_at_unix_ms: now_ms,
                json: r.json,
                deleted: false,
            });
        }
        seen.insert(key, digest);
    }
    for (kind, key) in last.keys().filter(|k| !seen.contains_key(*k)) {
        changed.push(pb::ReportedObject {
            kind: kind.clone(),
            key: key.clone(),
            observed_generation: 0,
            observed_at_unix_ms: now_ms,
            json: "null".into(),
            deleted: true,
        });
    }
    let mut batch = Vec::new();
    let mut bytes = 0;
    for object in changed {
        bytes += object.json.len() + object.key.len() + 32;
        batch.push(object);
        if bytes >= BATCH_BYTES {
            send(depot_message::Body::Reported(pb::ReportedBatch {
                objects: std::mem::take(&mut batch),
            }))
            .await?;
            bytes = 0;
        }
    }
    if !batch.is_empty() {
        send(depot_message::Body::Reported(pb::ReportedBatch {
            objects: batch,
        }))
        .await?;
    }
    // Only now: a send that failed leaves the old map, and the next session resends all.
    *last = seen;
    Ok(())
}
