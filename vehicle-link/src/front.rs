//! The vehicle-facing MQTT front of the embedded broker: it authenticates each vehicle and
//! enforces the topic ACL, then relays to the broker behind it on loopback.
//!
//! Why a front at all: rumqttd, the embedded broker, authenticates connections but has no topic
//! ACL, and without one any vehicle could publish another's state or read its commands. The
//! front reads every packet a vehicle sends (rumqttc's MQTT 3.1.1 codec), lets through only what
//! [`Topics::may_publish`] and [`Topics::may_subscribe`] allow, and closes the connection on
//! anything else, which MQTT 3.1.1 gives a server as its way to refuse a publication. What the
//! broker sends back is relayed untouched. With an external broker (Mosquitto) the same rules
//! are its ACL file (docs/vehicle-link.md).
//!
//! A vehicle signs in with its id as both client id and user name (so nobody can take over
//! another vehicle's session by reusing its client id) and its depot-issued password.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, Packet};
use rumqttc::mqttbytes::{self, Protocol};
use rumqttc::{ConnectReturnCode, Login};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::wire::{Topics, check_id};

/// Checks a vehicle's user name and password.
pub type Authenticate =
    Arc<dyn Fn(String, String) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Why the front closed or refused a connection; each is counted by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Nothing valid arrived in time, or the first packet was not a CONNECT.
    Handshake,
    /// Not MQTT 3.1.1.
    Protocol,
    /// No user name or password, client id different from the user name, or wrong password.
    Credentials,
    /// A publication, Last Will or subscription outside the vehicle's own topics.
    Acl,
    /// A packet that does not parse, or larger than the front accepts.
    Malformed,
    /// The broker behind the front is unreachable.
    Upstream,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Handshake => "handshake",
            Refusal::Protocol => "protocol",
            Refusal::Credentials => "credentials",
            Refusal::Acl => "acl",
            Refusal::Malformed => "malformed",
            Refusal::Upstream => "upstream",
        }
    }
}

/// What the front needs to know.
#[derive(Clone)]
pub struct FrontConfig {
    pub topics: Topics,
    /// The broker behind the front.
    pub upstream: SocketAddr,
    /// The login the front uses at the broker on every vehicle's behalf.
    pub upstream_login: (String, String),
    /// Largest packet a vehicle may send (payload larger than the wire limit still passes, so
    /// the depot can count it as oversized).
    pub max_packet: usize,
    pub connect_timeout: Duration,
    pub authenticate: Authenticate,
    /// Told of every refusal, for metrics.
    pub on_refusal: Arc<dyn Fn(Refusal) + Send + Sync>,
}

/// Serves vehicles on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, config: FrontConfig, shutdown: CancellationToken) {
    let config = Arc::new(config);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "mqtt front: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let config = config.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = connection(stream, &config) => {
                    if let Err((refusal, why)) = result {
                        (config.on_refusal)(refusal);
                        tracing::warn!(%peer, reason = refusal.as_str(), "mqtt front closed a connection: {why}");
                    }
                }
            }
        });
    }
}

type Closed = (Refusal, String);

async fn connection(mut client: TcpStream, config: &FrontConfig) -> Result<(), Closed> {
    let mut buf = BytesMut::with_capacity(4096);
    let connect = tokio::time::timeout(
        config.connect_timeout,
        read_packet(&mut client, &mut buf, config.max_packet),
    )
    .await
    .map_err(|_| (Refusal::Handshake, "no CONNECT in time".to_owned()))?
    .map_err(|e| (Refusal::Handshake, e))?;
    let Some(Packet::Connect(mut connect)) = connect else {
        return Err((Refusal::Handshake, "first packet is not CONNECT".into()));
    };
    if connect.protocol != Protocol::V4 {
        refuse(&mut client, ConnectReturnCode::RefusedProtocolVersion).await;
        return Err((Refusal::Protocol, "only MQTT 3.1.1 is served".into()));
    }
    let vehicle = match check_login(&connect, config).await {
        Ok(vehicle) => vehicle,
        Err(why) => {
            refuse(&mut client, ConnectReturnCode::NotAuthorized).await;
            return Err((Refusal::Credentials, why));
        }
    };
    if let Some(will) = &connect.last_will
        && !config.topics.may_publish(&vehicle, &will.topic)
    {
        refuse(&mut client, ConnectReturnCode::NotAuthorized).await;
        return Err((
            Refusal::Acl,
            format!(
                "vehicle {vehicle}: Last Will on {:?} is not its own",
                will.topic
            ),
        ));
    }

    let mut upstream = TcpStream::connect(config.upstream).await.map_err(|e| {
        (
            Refusal::Upstream,
            format!("broker at {}: {e}", config.upstream),
        )
    })?;
    let _ = upstream.set_nodelay(true);
    connect.login = Some(Login::new(
        config.upstream_login.0.clone(),
        config.upstream_login.1.clone(),
    ));
    let mut out = BytesMut::new();
    Packet::Connect(connect)
        .write(&mut out, usize::MAX)
        .map_err(|e| (Refusal::Malformed, e.to_string()))?;
    upstream
        .write_all(&out)
        .await
        .map_err(|e| (Refusal::Upstream, e.to_string()))?;

    let (mut up_read, mut up_write) = upstream.into_split();
    let (mut client_read, mut client_write) = client.into_split();
    let inbound = async {
        loop {
            let packet = read_packet(&mut client_read, &mut buf, config.max_packet)
                .await
                .map_err(|e| (Refusal::Malformed, format!("vehicle {vehicle}: {e}")))?;
            let Some(packet) = packet else { return Ok(()) };
            match &packet {
                Packet::Publish(p) if !config.topics.may_publish(&vehicle, &p.topic) => {
                    return Err((
                        Refusal::Acl,
                        format!("vehicle {vehicle} published to {:?}", p.topic),
                    ));
                }
                Packet::Subscribe(s) => {
                    if let Some(f) = s
                        .filters
                        .iter()
                        .find(|f| !config.topics.may_subscribe(&vehicle, &f.path))
                    {
                        return Err((
                            Refusal::Acl,
                            format!("vehicle {vehicle} subscribed to {:?}", f.path),
                        ));
                    }
                }
                Packet::Connect(_) => {
                    return Err((
                        Refusal::Malformed,
                        format!("vehicle {vehicle}: second CONNECT"),
                    ));
                }
                _ => {}
            }
            out.clear();
            packet
                .write(&mut out, usize::MAX)
                .map_err(|e| (Refusal::Malformed, e.to_string()))?;
            if up_write.write_all(&out).await.is_err() {
                return Ok(());
            }
        }
    };
    let outbound = async {
        // The broker's side needs no checks: relay bytes as they come.
        let _ = tokio::io::copy(&mut up_read, &mut client_write).await;
        Ok(())
    };
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
    }
}

/// The vehicle id of a valid login.
async fn check_login(connect: &Connect, config: &FrontConfig) -> Result<String, String> {
    let Some(login) = &connect.login else {
        return Err(format!("client {:?} sent no user name", connect.client_id));
    };
    check_id("vehicle id", &login.username).map_err(|e| e.to_string())?;
    if connect.client_id != login.username {
        return Err(format!(
            "client id {:?} is not the user name {:?}",
            connect.client_id, login.username
        ));
    }
    if !(config.authenticate)(login.username.clone(), login.password.clone()).await {
        return Err(format!(
            "vehicle {}: wrong or revoked credentials",
            login.username
        ));
    }
    Ok(login.username.clone())
}

async fn refuse(client: &mut TcpStream, code: ConnectReturnCode) {
    let mut out = BytesMut::new();
    if Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut out, usize::MAX)
        .is_ok()
    {
        let _ = client.write_all(&out).await;
    }
}

/// The next whole packet, `None` at a clean end of stream.
async fn read_packet<R: AsyncReadExt + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, String> {
    loop {
        match Packet::read(buf, max) {
            Ok(packet) => return Ok(Some(packet)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("bad packet: {e}")),
        }
        match reader.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("connection ended inside a packet".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
