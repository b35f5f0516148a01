//! The embedded broker: rumqttd on a loopback port only the depot knows, behind the
//! vehicle-facing front that authenticates vehicles and enforces the topic ACL
//! ([`atlasmesh_vehicle_link::front`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use atlasmesh_vehicle_link::front::{self, FrontConfig};
use atlasmesh_vehicle_link::wire::{MAX_PAYLOAD, Topics};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::LinkMetrics;
use crate::auth::new_secret;
use crate::store::Store;

/// Larger than any valid message, so an oversized one still reaches the depot and is counted
/// there; beyond this the front closes the connection.
const MAX_PACKET: usize = 4 * MAX_PAYLOAD;

pub struct Embedded {
    /// The broker itself, on loopback.
    pub internal: SocketAddr,
    /// The depot's own login at it.
    pub depot_login: (String, String),
}

/// Starts rumqttd and the front on `listener`.
pub async fn start(
    listener: TcpListener,
    topics: Topics,
    store: Store,
    metrics: LinkMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<Embedded> {
    // rumqttd binds the address it is given; take a free loopback port for it. Nothing but the
    // depot and its front can sign in there: both logins are random per start.
    let internal = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .context("finding a loopback port for the embedded broker")?;
    let depot_login = ("depot".to_owned(), new_secret(""));
    let front_login = ("front".to_owned(), new_secret(""));
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([(
            "vehicles".to_owned(),
            rumqttd::ServerSettings {
                name: "embedded-v4".into(),
                listen: internal,
                tls: None,
                next_connection_delay_ms: 0,
                connections: rumqttd::ConnectionSettings {
                    connection_timeout_ms: 10_000,
                    max_payload_size: MAX_PACKET,
                    max_inflight_count: 1_000,
                    auth: Some(HashMap::from([depot_login.clone(), front_login.clone()])),
                    external_auth: None,
                    dynamic_filters: true,
                },
            },
        )])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .context("starting the embedded broker's thread")?;
    wait_until_listening(internal).await?;

    let authenticate: front::Authenticate = Arc::new(move |vehicle, password| {
        let store = store.clone();
        Box::pin(async move {
            store
                .read(move |conn| super::db::check_secret(conn, &vehicle, &password))
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "could not check vehicle credentials");
                    false
                })
        })
    });
    let front_config = FrontConfig {
        topics,
        upstream: internal,
        upstream_login: front_login,
        max_packet: MAX_PACKET,
        connect_timeout: Duration::from_secs(10),
        authenticate,
        on_refusal: Arc::new(move |r| metrics.refused(r.as_str())),
    };
    tokio::spawn(front::serve(listener, front_config, shutdown));
    Ok(Embedded {
        internal,
        depot_login,
    })
}

async fn wait_until_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e).context(format!("the embedded broker did not listen on {addr}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
