//! The cloud's gRPC side: enrolment, renewal and the depot sync sessions, over mutual TLS
//! from the fleet CA, with the standard health service and reflection beside them.
//!
//! A session is a task per depot: it answers the depot's hello with a welcome and any desired
//! changes it lacks, stores what the depot streams (events once per id, reports latest per key)
//! and acknowledges events after they are committed. It polls the store for desired changes and
//! revocation, so a change made through any cloud instance on a shared database reaches the
//! depot whichever instance holds its session.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::desired::object_to_wire;
use crate::pb::{self, cloud_message, depot_message};
use crate::pki::{self, Ca, DepotCert};
use crate::store::{CloudStore, DepotRow, EventRow, ReportedRow, TokenRefused};
use crate::token::EnrollToken;

/// A clock in Unix milliseconds, injected so tests can move time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| pki::unix_ms(SystemTime::now()))
}

/// What the service needs; cheap to clone.
#[derive(Clone)]
pub struct CloudService {
    store: CloudStore,
    ca: Arc<Ca>,
    options: ServiceOptions,
    clock: Clock,
    trust: Option<Arc<dyn FleetTrust>>,
}

/// What the cloud vouches for beyond certificates: the fleet's image repository root, and
/// certifying a depot's director root (both belong to the image repository, which lives in
/// the appliance).
pub trait FleetTrust: Send + Sync + 'static {
    /// The fleet root to hand to depots that have none pinned.
    fn fleet_root(&self) -> Option<Vec<u8>>;
    /// A statement binding `local_id` to `director_root`, or `None` when the cloud cannot
    /// certify (no certifier key, or a root that is not a version-1 TUF root).
    fn certify(&self, depot: &str, local_id: &str, director_root: &[u8]) -> Option<Vec<u8>>;
}

#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// How long a depot certificate lives; depots renew after two thirds of it.
    pub depot_cert_lifetime: Duration,
    /// How often a session looks for desired changes and revocation.
    pub poll_interval: Duration,
    /// How long a new session may take to say hello.
    pub hello_timeout: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            depot_cert_lifetime: Duration::from_secs(30 * 24 * 3600),
            poll_interval: Duration::from_secs(2),
            hello_timeout: Duration::from_secs(30),
        }
    }
}

impl CloudService {
    pub fn new(store: CloudStore, ca: Arc<Ca>, options: ServiceOptions, clock: Clock) -> Self {
        Self {
            store,
            ca,
            options,
            clock,
            trust: None,
        }
    }

    /// Hands depots the fleet root and director certificates from `trust`.
    pub fn with_trust(mut self, trust: Arc<dyn FleetTrust>) -> Self {
        self.trust = Some(trust);
        self
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    /// The depot behind the request's client certificate, if it may talk.
    async fn caller<T>(&self, request: &Request<T>) -> Result<(DepotRow, DepotCert), Status> {
        self.authorise_peer(request.peer_certs().as_deref().map(|c| &c[..]))
            .await
    }

    /// The depot behind a TLS peer's certificate chain, if it may talk; also for plain HTTP
    /// routes served on the same port (the image repository).
    pub async fn authorise_peer(
        &self,
        certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<(DepotRow, DepotCert), Status> {
        let certs = certs.ok_or_else(|| {
            Status::unauthenticated("a depot certificate is required (enrol first)")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a depot certificate is required"))?;
        let cert = pki::read_depot_cert(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        match self
            .store
            .authorise_cert(&cert.depot_id, &cert.serial)
            .await
            .map_err(internal)?
        {
            Ok(depot) => Ok((depot, cert)),
            Err(reason) => {
                tracing::warn!(depot_id = %cert.depot_id, serial = %cert.serial, %reason, "depot refused");
                Err(Status::permission_denied(reason))
            }
        }
    }

    /// Signs the depot's CSR and records the certificate (`supersede` on enrolment revokes the
    /// depot's earlier ones).
    async fn issue(
        &self,
        depot: &DepotRow,
        csr_pem: &str,
        now: i64,
        supersede: bool,
        version: &str,
    ) -> Result<pki::Issued, Status> {
        let issued = self
            .ca
            .sign_depot(
                csr_pem,
                &depot.id,
                &depot.name,
                self.options.depot_cert_lifetime,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.store
            .record_cert(&depot.id, &issued, now, supersede, version)
            .await
            .map_err(internal)?;
        Ok(issued)
    }

    fn enroll_response(&self, depot: &DepotRow, issued: &pki::Issued) -> pb::EnrollResponse {
        pb::EnrollResponse {
            depot_id: depot.id.clone(),
            depot_name: depot.name.clone(),
            certificate_pem: issued.pem.clone(),
            ca_certificate_pem: self.ca.cert_pem().to_owned(),
            not_after_unix_ms: issued.not_after_ms,
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "cloud store failed");
    Status::unavailable(format!("the cloud store failed: {e}"))
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for CloudService {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let req = request.into_inner();
        let token = EnrollToken::parse(&req.token).map_err(Status::invalid_argument)?;
        if token.ca_fingerprint() != self.ca.fingerprint() {
            return Err(Status::invalid_argument(
                "this token was minted for another fleet CA",
            ));
        }
        // A bad request must not spend the token.
        pki::check_csr(&req.csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = self.now();
        let depot = match self
            .store
            .consume_enroll_token(&token.secret_hash(), now)
            .await
            .map_err(internal)?
        {
            Ok(depot) => depot,
            Err(refused) => {
                let _ = self
                    .store
                    .audit(
                        now,
                        "depot:unknown",
                        "depot.enroll",
                        None,
                        "denied",
                        &serde_json::json!({ "reason": refused.to_string() }),
                    )
                    .await;
                return Err(match refused {
                    TokenRefused::Revoked => Status::permission_denied(refused.to_string()),
                    _ => Status::unauthenticated(refused.to_string()),
                });
            }
        };
        let issued = self
            .issue(&depot, &req.csr_pem, now, true, &req.software_version)
            .await?;
        tracing::info!(depot = %depot.name, depot_id = %depot.id, serial = %issued.serial, "depot enrolled");
        Ok(Response::new(self.enroll_response(&depot, &issued)))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let (depot, _) = self.caller(&request).await?;
        let req = request.into_inner();
        let issued = self
            .issue(&depot, &req.csr_pem, self.now(), false, "")
            .await?;
        tracing::info!(depot = %depot.name, serial = %issued.serial, "depot certificate renewed");
        Ok(Response::new(self.enroll_response(&depot, &issued)))
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::CloudMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::depot_sync_server::DepotSync for CloudService {
    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<pb::DepotMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (depot, cert) = self.caller(&request).await?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let service = self.clone();
        tokio::spawn(async move {
            let name = depot.name.clone();
            let result = Session {
                service,
                depot,
                serial: cert.serial,
                tx: tx.clone(),
            }
            .run(inbound)
            .await;
            match result {
                Ok(()) => tracing::info!(depot = %name, "sync session ended"),
                Err(status) => {
                    tracing::warn!(depot = %name, error = %status.message(), "sync session failed");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    service: CloudService,
    depot: DepotRow,
    serial: String,
    tx: mpsc::Sender<Result<pb::CloudMessage, Status>>,
}

impl Session {
    async fn send(&self, body: cloud_message::Body) -> Result<(), Status> {
        self.tx
            .send(Ok(pb::CloudMessage { body: Some(body) }))
            .await
            .map_err(|_| Status::cancelled("the depot went away"))
    }

    async fn run(self, mut inbound: Streaming<pb::DepotMessage>) -> Result<(), Status> {
        let store = &self.service.store;
        let id = self.depot.id.clone();
        let first = tokio::time::timeout(self.service.options.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello from the depot"))??;
        let hello = match first.and_then(|m| m.body) {
            Some(depot_message::Body::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("a session starts with a hello")),
        };
        let (events_acked, _) = store
            .session_hello(
                &id,
                hello.desired_revision,
                &hello.software_version,
                hello.outbox_dropped_total,
                self.service.now(),
            )
            .await
            .map_err(internal)?;
        tracing::info!(depot = %self.depot.name, version = %hello.software_version, desired_revision = hello.desired_revision, events_acked, "sync session started");
        let trust = self.service.trust.as_deref();
        let fleet_root = trust.and_then(|t| t.fleet_root()).unwrap_or_default();
        let director_certificate = match trust {
            Some(t) if !hello.director_root.is_empty() && !hello.local_id.is_empty() => t
                .certify(&self.depot.name, &hello.local_id, &hello.director_root)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        self.send(cloud_message::Body::Welcome(pb::Welcome {
            depot_id: id.clone(),
            depot_name: self.depot.name.clone(),
            events_acked: u64::try_from(events_acked).unwrap_or(0),
            server_time_unix_ms: self.service.now(),
            fleet_root,
            director_certificate,
        }))
        .await?;

        // The depot holds `acked`; changes are always sent relative to it, so a refused
        // revision is offered again (with any fix) rather than skipped.
        let mut acked = i64::try_from(hello.desired_revision).unwrap_or(i64::MAX);
        let mut sent = acked;
        let mut poll = tokio::time::interval(self.service.options.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Some(message) = message? else { return Ok(()) };
                    match message.body {
                        Some(depot_message::Body::Events(batch)) => {
                            let events: Vec<EventRow> = batch.events.into_iter().map(|e| EventRow {
                                sequence: i64::try_from(e.sequence).unwrap_or(i64::MAX),
                                at_ms: e.at_unix_ms,
                                json: serde_json::from_str(&e.json).unwrap_or(serde_json::Value::String(e.json)),
                                id: e.id,
                                kind: e.kind,
                            }).collect();
                            let upto = store.store_events(&id, &events, self.service.now()).await.map_err(internal)?;
                            self.send(cloud_message::Body::EventsAck(pb::EventsAck { sequence: u64::try_from(upto).unwrap_or(0) })).await?;
                        }
                        Some(depot_message::Body::Reported(batch)) => {
                            let objects: Vec<ReportedRow> = batch.objects.into_iter().map(|o| ReportedRow {
                                observed_generation: i64::try_from(o.observed_generation).unwrap_or(i64::MAX),
                                observed_ms: o.observed_at_unix_ms,
                                json: serde_json::from_str(&o.json).unwrap_or(serde_json::Value::String(o.json)),
                                deleted: o.deleted,
                                kind: o.kind,
                                key: o.key,
                            }).collect();
                            store.store_reported(&id, &objects, self.service.now()).await.map_err(internal)?;
                        }
                        Some(depot_message::Body::DesiredAck(ack)) => {
                            store.desired_acked(&id, ack.revision).await.map_err(internal)?;
                            acked = acked.max(i64::try_from(ack.revision).unwrap_or(i64::MAX));
                        }
                        Some(depot_message::Body::DesiredRefused(refused)) => {
                            tracing::warn!(depot = %self.depot.name, revision = refused.revision, reason = %refused.reason, "depot refused a desired revision");
                            store.desired_refused(&id, refused.revision, &refused.reason).await.map_err(internal)?;
                        }
                        Some(depot_message::Body::Hello(_)) | None => {
                            return Err(Status::invalid_argument("unexpected message in a session"));
                        }
                    }
                }
                _ = poll.tick() => {
                    if let Err(reason) = store.authorise_cert(&id, &self.serial).await.map_err(internal)? {
                        return Err(Status::permission_denied(reason));
                    }
                    store.touch(&id, self.service.now()).await.map_err(internal)?;
                    let current = store.desired_revision(&id).await.map_err(internal)?;
                    if current > sent {
                        sent = self.send_desired(acked).await?.max(sent);
                        // Nothing to send (only the counter moved): do not ask again.
                        sent = sent.max(current);
                    }
                }
            }
        }
    }

    /// Sends the changes after `base`; returns the revision sent.
    async fn send_desired(&self, base: i64) -> Result<i64, Status> {
        let store = &self.service.store;
        let rows = store
            .desired_since(&self.depot.id, base)
            .await
            .map_err(internal)?;
        let Some(revision) = rows.iter().map(|r| r.revision).max() else {
            return Ok(base);
        };
        // A depot that holds nothing gets the whole state, without tombstones.
        let full = base == 0;
        let objects = rows
            .iter()
            .filter(|r| !full || r.spec.is_some())
            .map(|r| {
                object_to_wire(
                    &r.kind,
                    &r.key,
                    u64::try_from(r.generation).unwrap_or(0),
                    r.spec.as_ref(),
                )
            })
            .collect::<Vec<_>>();
        if full && objects.is_empty() {
            // Everything was set and removed again: nothing to hold, nothing to send.
            return Ok(revision);
        }
        self.send(cloud_message::Body::Desired(pb::DesiredState {
            revision: u64::try_from(revision).unwrap_or(0),
            full,
            objects,
            base_revision: u64::try_from(base).unwrap_or(0),
        }))
        .await?;
        Ok(revision)
    }
}

/// The gRPC server's TLS material: its certificate chain (leaf then CA) and key, and the CA
/// that client certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    pub chain_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

impl ServerTls {
    /// A fresh server certificate from the CA for `names`, kept only in memory.
    pub fn from_ca(ca: &Ca, names: &[String]) -> Result<Self, pki::PkiError> {
        let (issued, key_pem) = ca.issue_server(names, Duration::from_secs(365 * 24 * 3600))?;
        Ok(Self {
            chain_pem: format!("{}{}", issued.pem, ca.cert_pem()),
            key_pem,
            client_ca_pem: ca.cert_pem().to_owned(),
        })
    }
}

/// Serves enrolment, sync, health and reflection on `listener` until `shutdown`, and `extra`
/// HTTP routes on the same port (the image repository, for depots over the same mutual TLS;
/// its handlers check the peer certificate with [`CloudService::authorise_peer`]).
pub async fn serve(
    listener: TcpListener,
    tls: ServerTls,
    service: CloudService,
    extra: axum::Router,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::depot_sync_server::DepotSyncServer<CloudService>>()
        .await;
    health
        .set_serving::<pb::enrollment_server::EnrollmentServer<CloudService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both reflection versions: grpcurl and grpcio's reflection client still ask v1alpha.
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.chain_pem, &tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.client_ca_pem))
        // Enrolment comes before a depot has a certificate; every other call checks for one.
        .client_auth_optional(true);
    Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_routes(tonic::service::Routes::from(extra))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::enrollment_server::EnrollmentServer::new(
            service.clone(),
        ))
        .add_service(pb::depot_sync_server::DepotSyncServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await
}
