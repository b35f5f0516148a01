//! The depot side of the vehicle link: one MQTT client (rumqttc) subscribed to every vehicle's
//! upward topics, a writer that applies checked messages to the registry in batches, typed
//! events for the services that act on vehicles (canary, charging), and the depot's commands
//! to vehicles.
//!
//! No message is lost to a crash: the client acknowledges a QoS 1 message only after the batch
//! holding it is committed, so the broker redelivers anything the depot had not stored. Every
//! message that cannot be applied (malformed, oversized, from an unregistered vehicle, on a
//! topic that is not ours) is counted in `atlasmesh_vehicle_messages_total` and logged, never
//! fatal.

mod broker;
pub mod db;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use atlasmesh_vehicle_link::wire::{
    self, Downward, Health, Message, OtaAction, OtaCommand, OtaReport, State, Topics, Upward,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::VehicleLinkConfig;
use crate::http::{Clock, PanelEvent};
use crate::store::{Store, unix_ms};

/// What happened to a vehicle, for the services that act on it.
#[derive(Debug, Clone)]
pub enum VehicleEvent {
    Docked {
        vehicle: String,
        bay: Option<String>,
    },
    Undocked {
        vehicle: String,
    },
    State {
        vehicle: String,
        state: State,
    },
    Ota {
        vehicle: String,
        report: OtaReport,
    },
    Health {
        vehicle: String,
        health: Health,
    },
    Link {
        vehicle: String,
        online: bool,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone)]
pub struct LinkMetrics {
    messages: Family<MessageLabels, Counter>,
    lag: Histogram,
    connected: Gauge,
    reconnects: Counter,
    refusals: Family<ReasonLabels, Counter>,
    commands: Family<MessageLabels, Counter>,
}

impl LinkMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = LinkMetrics {
            messages: Family::default(),
            // 0.5 ms to about a minute in steps of 1.5: fine enough to read a p95 off a
            // loaded broker, wide enough for store-and-forward backlogs after a dropped link.
            lag: Histogram::new(exponential_buckets(0.0005, 1.5, 30)),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            refusals: Family::default(),
            commands: Family::default(),
        };
        registry.register(
            "atlasmesh_vehicle_messages",
            "Vehicle messages received, by kind and result (applied, stale, or why dropped)",
            m.messages.clone(),
        );
        registry.register(
            "atlasmesh_vehicle_message_lag_seconds",
            "From the vehicle's timestamp to the message applied in the registry",
            m.lag.clone(),
        );
        registry.register(
            "atlasmesh_vehicle_link_connected",
            "1 while the depot is connected to the broker and subscribed to the vehicles' topics",
            m.connected.clone(),
        );
        registry.register(
            "atlasmesh_vehicle_link_reconnects",
            "Lost broker connections",
            m.reconnects.clone(),
        );
        registry.register(
            "atlasmesh_mqtt_front_refusals",
            "Vehicle connections the embedded broker's front refused or closed, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "atlasmesh_vehicle_commands",
            "Commands published to vehicles, by kind and result",
            m.commands.clone(),
        );
        m
    }

    fn count(&self, kind: &str, result: &str) {
        self.messages
            .get_or_create(&MessageLabels {
                kind: kind.into(),
                result: result.into(),
            })
            .inc();
    }

    fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
}

/// Which broker the depot uses.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BrokerInfo {
    /// rumqttd in process; vehicles connect to `listen`.
    Embedded {
        listen: SocketAddr,
    },
    External {
        url: String,
    },
}

/// The running link; cheap to share.
pub struct VehicleLink {
    client: AsyncClient,
    topics: Topics,
    public_url: String,
    store: Store,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<VehicleEvent>,
    metrics: LinkMetrics,
    pub broker: BrokerInfo,
}

/// Everything [`VehicleLink::start`] needs.
pub struct LinkParts {
    pub config: VehicleLinkConfig,
    pub depot_id: String,
    /// The vehicle-facing listener of the embedded broker (unused with an external one).
    pub listener: Option<TcpListener>,
    /// Depot's HTTP address, for the default public URL.
    pub http_addr: SocketAddr,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub panel: broadcast::Sender<PanelEvent>,
}

impl VehicleLink {
    pub async fn start(
        parts: LinkParts,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<VehicleLink>> {
        let LinkParts {
            config,
            depot_id,
            listener,
            http_addr,
            store,
            clock,
            panel,
        } = parts;
        let topics = Topics::new(&depot_id).context("depot id as an MQTT topic level")?;
        let metrics = LinkMetrics::register(registry);
        let (host, port, login, broker) = match &config.broker_url {
            None => {
                let listener = listener.context("the embedded broker needs its listener")?;
                let listen = listener.local_addr()?;
                let embedded = broker::start(
                    listener,
                    topics.clone(),
                    store.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                )
                .await?;
                (
                    embedded.internal.ip().to_string(),
                    embedded.internal.port(),
                    Some(embedded.depot_login),
                    BrokerInfo::Embedded { listen },
                )
            }
            Some(url) => {
                let (host, port, login) = external_broker(&config, url)?;
                (host, port, login, BrokerInfo::External { url: redact(url) })
            }
        };
        let mut options = MqttOptions::new(format!("atlasmesh-depot-{depot_id}"), host, port);
        options
            .set_keep_alive(Duration::from_secs(15))
            // A persistent session: the broker keeps QoS 1 messages for the depot while it
            // restarts (store-and-forward on the depot's side of the link).
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_inflight(200)
            // Oversized payloads must reach us to be counted, not break the connection.
            .set_max_packet_size(1024 * 1024, 64 * 1024);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, eventloop) = AsyncClient::new(options, 4096);
        let (events, _) = broadcast::channel(4096);
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| default_public_url(http_addr));
        let link = Arc::new(VehicleLink {
            client,
            topics,
            public_url,
            store,
            clock,
            events,
            metrics,
            broker,
        });
        let generation = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel(8192);
        let changed = Arc::new(Mutex::new(HashSet::new()));
        tokio::spawn(
            link.clone()
                .run_client(eventloop, tx, generation.clone(), shutdown.clone()),
        );
        tokio::spawn(link.clone().run_writer(rx, generation, changed.clone()));
        tokio::spawn(link.clone().run_panel_feed(panel, changed, shutdown));
        Ok(link)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<VehicleEvent> {
        self.events.subscribe()
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Tells vehicles (one, or every one) that have an assignment they do not run yet what to
    /// fetch and from where.
    pub async fn notify_ota(&self, vehicle: Option<String>) {
        let pending = match self
            .store
            .read(move |conn| db::pending_notifications(conn, vehicle.as_deref()))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read pending OTA assignments");
                return;
            }
        };
        for (vehicle, version, hardware_id) in pending {
            let command = OtaCommand {
                action: OtaAction::Install,
                version,
                to_version: None,
                hardware_id,
                depot_url: self.public_url.clone(),
                ts_ms: unix_ms(self.clock.now()),
            };
            let payload = serde_json::to_vec(&command).unwrap_or_default();
            let topic = self.topics.downward(&vehicle, Downward::Ota);
            let result = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await;
            let labels = MessageLabels {
                kind: "ota".into(),
                result: if result.is_ok() { "sent" } else { "failed" }.into(),
            };
            self.metrics.commands.get_or_create(&labels).inc();
            match result {
                Ok(()) => {
                    tracing::info!(vehicle = %vehicle, version = %command.version, "told the vehicle to fetch its assigned version")
                }
                Err(e) => {
                    tracing::warn!(vehicle = %vehicle, error = %e, "could not publish an OTA notification")
                }
            }
        }
    }

    /// Tells a vehicle to leave `version` for the one on its other slot (a canary halt or
    /// failure); its assignment has been withdrawn already. Sent again whenever the rollout
    /// still waits for the vehicle's report, so a lost message only delays it.
    pub async fn command_rollback(
        &self,
        vehicle: &str,
        version: &str,
        to_version: Option<&str>,
        hardware_id: &str,
    ) {
        let command = OtaCommand {
            action: OtaAction::Rollback,
            version: version.to_owned(),
            to_version: to_version.map(str::to_owned),
            hardware_id: hardware_id.to_owned(),
            depot_url: self.public_url.clone(),
            ts_ms: unix_ms(self.clock.now()),
        };
        let payload = serde_json::to_vec(&command).unwrap_or_default();
        let topic = self.topics.downward(vehicle, Downward::Ota);
        let result = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await;
        let labels = MessageLabels {
            kind: "rollback".into(),
            result: if result.is_ok() { "sent" } else { "failed" }.into(),
        };
        self.metrics.commands.get_or_create(&labels).inc();
        match result {
            Ok(()) => tracing::info!(vehicle, version, "told the vehicle to roll back"),
            Err(e) => {
                tracing::warn!(vehicle, error = %e, "could not publish a rollback command")
            }
        }
    }

    async fn run_client(
        self: Arc<Self>,
        mut eventloop: rumqttc::EventLoop,
        tx: mpsc::Sender<(u64, Publish)>,
        generation: Arc<AtomicU64>,
        shutdown: CancellationToken,
    ) {
        const FIRST_RETRY: Duration = Duration::from_millis(250);
        let mut retry = FIRST_RETRY;
        let filter = self.topics.upward_filter();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.client.try_disconnect();
                    break;
                }
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    retry = FIRST_RETRY;
                    // Acks of messages from an earlier connection must not be sent on this
                    // one: their packet ids mean something else now. The broker redelivers.
                    generation.fetch_add(1, Ordering::SeqCst);
                    // Subscribing on every connection: a broker that lost its sessions
                    // (restarted without persistence) knows nothing of us otherwise.
                    if let Err(e) = self.client.try_subscribe(&filter, QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "could not subscribe to vehicle topics");
                    }
                    tracing::info!(broker = ?self.broker, filter = %filter, "connected to the vehicle broker");
                    let link = self.clone();
                    tokio::spawn(async move { link.notify_ota(None).await });
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let tagged = (generation.load(Ordering::SeqCst), publish);
                    if tx.send(tagged).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::error!(filter = %filter, "the broker refused the depot's subscription; check its ACL");
                    } else {
                        // Connected means hearing the vehicles: only from here on does the
                        // broker pass their messages on.
                        self.metrics.connected.set(1);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.metrics.connected.set(0);
                    self.metrics.reconnects.inc();
                    tracing::warn!(error = %e, retry_in = ?retry, "vehicle broker connection lost; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(15));
                }
            }
        }
        self.metrics.connected.set(0);
    }

    /// Applies messages in batches: one transaction (one fsync) for as many as are waiting.
    async fn run_writer(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<(u64, Publish)>,
        generation: Arc<AtomicU64>,
        changed: Arc<Mutex<HashSet<String>>>,
    ) {
        const MAX_BATCH: usize = 2048;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let mut checked = Vec::with_capacity(batch.len());
            for (_, publish) in &batch {
                match self.check(publish) {
                    Ok((vehicle, kind, message)) => checked.push((vehicle, kind, message)),
                    Err((kind, e)) => {
                        self.metrics.count(kind, e.reason());
                        tracing::warn!(topic = %publish.topic, bytes = publish.payload.len(), reason = e.reason(), "dropped a vehicle message: {e}");
                    }
                }
            }
            let Some(outcome) = self.apply(checked).await else {
                // Not stored, so not acknowledged: the broker redelivers on the next
                // connection. Drop ours so that happens soon.
                let _ = self.client.try_disconnect();
                batch.clear();
                continue;
            };
            {
                let now_ms = unix_ms(self.clock.now());
                let mut touched = changed.lock().unwrap_or_else(|p| p.into_inner());
                for Stored {
                    vehicle,
                    kind,
                    ts,
                    applied,
                    event,
                } in outcome
                {
                    self.metrics.count(kind.as_str(), applied.as_str());
                    if applied == db::Applied::UnknownVehicle {
                        tracing::warn!(vehicle = %vehicle, kind = kind.as_str(), "dropped a message from an unregistered vehicle");
                        continue;
                    }
                    if let Some(ts) = ts {
                        self.metrics
                            .lag
                            .observe((now_ms - ts).max(0) as f64 / 1000.0);
                    }
                    if let Some(event) = event {
                        self.react(&event);
                        let _ = self.events.send(event);
                    }
                    touched.insert(vehicle);
                }
            }
            if outcome_acked(&self.client, &batch, generation.load(Ordering::SeqCst)).await {
                batch.clear();
            } else {
                break;
            }
        }
    }

    /// Topic and payload checks, without the store.
    fn check(
        &self,
        publish: &Publish,
    ) -> Result<(String, Upward, Message), (&'static str, wire::WireError)> {
        let (vehicle, kind) = self
            .topics
            .parse_upward(&publish.topic)
            .map_err(|e| ("unknown", e))?;
        let message = wire::parse_upward(kind, &publish.payload).map_err(|e| (kind.as_str(), e))?;
        Ok((vehicle, kind, message))
    }

    async fn apply(&self, checked: Vec<(String, Upward, Message)>) -> Option<Vec<Stored>> {
        let mut wait = Duration::from_millis(200);
        let checked = Arc::new(checked);
        for attempt in 1..=5 {
            let now = unix_ms(self.clock.now());
            let work = checked.clone();
            let result = self
                .store
                .write(move |tx| -> Result<_, crate::store::StoreError> {
                    let mut out = Vec::with_capacity(work.len());
                    for (vehicle, kind, message) in work.iter() {
                        let (applied, event) = db::apply(tx, vehicle, message, now)?;
                        out.push(Stored {
                            vehicle: vehicle.clone(),
                            kind: *kind,
                            ts: message_ts(message),
                            applied,
                            event,
                        });
                    }
                    Ok(out)
                })
                .await;
            match result {
                Ok(out) => return Some(out),
                Err(e) => {
                    tracing::error!(error = %e, attempt, messages = checked.len(), "could not store vehicle messages; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
        None
    }

    /// What the link itself does about an event: a docking vehicle, or one coming back online
    /// in its bay, hears about its pending assignment. (A vehicle coming online before it
    /// docks hears at its dock event: told at once, it could act on the command before its
    /// dock is stored.)
    fn react(self: &Arc<Self>, event: &VehicleEvent) {
        let (vehicle, docked) = match event {
            VehicleEvent::Docked { vehicle, .. } => (vehicle.clone(), true),
            VehicleEvent::Link {
                vehicle,
                online: true,
            } => (vehicle.clone(), false),
            _ => return,
        };
        let link = self.clone();
        tokio::spawn(async move {
            if !docked {
                let id = vehicle.clone();
                match link.store.read(move |c| db::is_docked(c, &id)).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(vehicle = %vehicle, error = %e, "could not read whether the vehicle is docked");
                        return;
                    }
                }
            }
            link.notify_ota(Some(vehicle)).await
        });
    }

    /// Pushes changed vehicles and the bay board to open panels, at most once a second.
    async fn run_panel_feed(
        self: Arc<Self>,
        panel: broadcast::Sender<PanelEvent>,
        changed: Arc<Mutex<HashSet<String>>>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let ids: Vec<String> = {
                let mut set = changed.lock().unwrap_or_else(|p| p.into_inner());
                if set.is_empty() {
                    continue;
                }
                set.drain().collect()
            };
            if panel.receiver_count() == 0 {
                continue;
            }
            let read = self
                .store
                .read(move |conn| -> Result<_, crate::store::StoreError> {
                    let mut vehicles = Vec::with_capacity(ids.len());
                    for id in &ids {
                        vehicles.extend(db::get(conn, id)?);
                    }
                    Ok((vehicles, db::bays(conn)?))
                })
                .await;
            match read {
                Ok((vehicles, bays)) => {
                    let _ = panel.send(PanelEvent {
                        kind: "vehicles",
                        data: serde_json::json!(vehicles),
                    });
                    let _ = panel.send(PanelEvent {
                        kind: "bays",
                        data: serde_json::json!(bays),
                    });
                }
                Err(e) => tracing::warn!(error = %e, "could not read vehicles for the panel"),
            }
        }
    }
}

/// One message as the registry took it.
struct Stored {
    vehicle: String,
    kind: Upward,
    ts: Option<i64>,
    applied: db::Applied,
    event: Option<VehicleEvent>,
}

/// Acknowledges a stored batch, unless the connection it came on is gone. False when the
/// client is shut down.
async fn outcome_acked(client: &AsyncClient, batch: &[(u64, Publish)], current: u64) -> bool {
    for (generation, publish) in batch {
        if *generation != current || publish.qos == QoS::AtMostOnce {
            continue;
        }
        if client.ack(publish).await.is_err() {
            return false;
        }
    }
    true
}

fn message_ts(message: &Message) -> Option<i64> {
    match message {
        Message::Dock(m) => Some(m.ts_ms),
        Message::State(m) => Some(m.ts_ms),
        Message::Ota(m) => Some(m.ts_ms),
        Message::Health(m) => Some(m.ts_ms),
        Message::Link(_) => None,
    }
}

/// A user name and password.
type Login = (String, String);

/// The URL, host and port of a broker URL (`mqtt://host[:port]`, port 1883 by default);
/// `what` names where the URL came from, for the error.
pub fn broker_address(what: &str, url: &str) -> anyhow::Result<(url::Url, String, u16)> {
    let parsed = url::Url::parse(url).with_context(|| format!("{what} {url:?}"))?;
    if !matches!(parsed.scheme(), "mqtt" | "tcp") {
        anyhow::bail!(
            "{what}: scheme {:?} is not served; use mqtt://host:port",
            parsed.scheme()
        );
    }
    let host = parsed
        .host_str()
        .with_context(|| format!("{what} has no host"))?
        .to_owned();
    let port = parsed.port().unwrap_or(1883);
    Ok((parsed, host, port))
}

/// Host, port and login of an external broker URL (`mqtt://[user[:password]@]host[:port]`);
/// `username` and `password_file` in the configuration win over the URL's.
fn external_broker(
    config: &VehicleLinkConfig,
    url: &str,
) -> anyhow::Result<(String, u16, Option<Login>)> {
    let (parsed, host, port) = broker_address("vehicle_link.broker_url", url)?;
    let user = config
        .username
        .clone()
        .or_else(|| (!parsed.username().is_empty()).then(|| parsed.username().to_owned()));
    let password = match &config.password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("vehicle_link.password_file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        None => parsed.password().map(str::to_owned),
    };
    Ok((host, port, user.map(|u| (u, password.unwrap_or_default()))))
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

fn default_public_url(http: SocketAddr) -> String {
    if http.ip().is_unspecified() {
        let host = sysinfo::System::host_name().unwrap_or_else(|| "localhost".into());
        format!("http://{host}:{}/", http.port())
    } else {
        format!("http://{http}/")
    }
}
