//! Canary benchmark (issue 5): how long from the vehicle report that makes the gate fail to the
//! halt's rollback commands reaching the vehicles, through the real depot.
//!
//! A release depot (embedded broker) with a staged, certified image; eight vehicles (rumqttc
//! clients of the bench, with their own logins) docked, plugged in and eligible. Each round
//! starts a rollout whose canary is five vehicles; once they hold their assignment, one of them
//! reports a failed install. The clock runs from just before that report is published to the
//! moment each of the five receives its `cmd/ota` rollback (the failed vehicle included: its
//! assignment is withdrawn too). Between the two: the depot's MQTT client, the registry batch,
//! the event, the gate, the stored step with its log entry, the director re-signed without the
//! assignments, and five MQTT publications. Then an admin rolls the rollout back and the next
//! round starts.
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-canary [ROUNDS]`
//! (default 100). Prints Markdown for docs/benchmarks.md.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlasmesh_tests::bench::{build_release, machine};
use atlasmesh_tests::http;
use atlasmesh_tests::ota::{Fleet, OtaDepot, random_bytes};
use atlasmesh_vehicle_link::wire::{
    Dock, Link, OtaAction, OtaCommand, OtaOutcome, OtaPhase, OtaReport, Slot, State, Topics, Upward,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const HW: &str = "bench-hw";
const DEPOT: &str = "bench-canary";
const VEHICLES: usize = 8;
const CANARY: u64 = 5;

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

struct Received {
    vehicle: String,
    command: OtaCommand,
    at: Instant,
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().context("ROUNDS is a number"))
        .transpose()?
        .unwrap_or(100);
    build_release()?;
    let fleet = Fleet::new()?;
    fleet.add(HW, "2.0.0", &random_bytes(1 << 20, 5), &[])?;
    let depot = OtaDepot::start(&fleet, &[("ATLASMESH_DEPOT__ID", DEPOT)])?;
    let staged = depot.stage_dir(&fleet.repo, HW, "2.0.0")?;
    if staged["state"] != "staged" {
        bail!("staging failed: {staged}");
    }
    depot.certify(&fleet)?;
    let broker: std::net::SocketAddr = depot
        .server
        .mqtt
        .as_deref()
        .context("the depot runs its embedded broker")?
        .parse()?;

    let mut logins = Vec::new();
    for i in 0..VEHICLES {
        let id = format!("veh-{i:02}");
        let response = http()
            .post(depot.url("/api/v1/vehicles"))
            .bearer_auth(&depot.token)
            .json(&json!({"id": id, "hardware_id": HW}))
            .send()?;
        let body: Value = response.json()?;
        let password = body["mqtt"]["password"]
            .as_str()
            .with_context(|| format!("registering {id}: {body}"))?
            .to_owned();
        logins.push((id, password));
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // Timers are made outside `block_on` below.
    let _entered = runtime.enter();
    let topics = Topics::new(DEPOT)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Received>();
    let clients: HashMap<String, AsyncClient> =
        runtime.block_on(connect(&logins, broker, &topics, tx))?;

    // Every vehicle shows up in the registry, eligible.
    wait_until("the vehicles are ready", || {
        let ready = (0..VEHICLES).all(|i| {
            let r = depot
                .get(&format!(
                    "/api/v1/vehicles/veh-{i:02}/readiness?version=2.0.0"
                ))
                .unwrap_or(Value::Null);
            r["ready"] == true
        });
        Ok(ready)
    })?;

    let mut to_all = Vec::with_capacity(rounds);
    let mut to_first = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let response = http()
            .post(depot.url("/api/v1/rollouts"))
            .bearer_auth(&depot.token)
            .json(&json!({
                "version": "2.0.0",
                "waves": [{"count": CANARY}, {"percent": 100}],
                "gate": {"threshold": 0.8, "confidence": 0.8},
                "soak": "1h", "vehicle_deadline": "2h",
            }))
            .send()?;
        let rollout: Value = response.json()?;
        let id = rollout["id"]
            .as_i64()
            .with_context(|| format!("round {round}: {rollout}"))?;
        let assigned: Vec<String> = rollout["vehicles"]
            .as_array()
            .context("vehicles")?
            .iter()
            .filter(|v| v["stage"] == "assigned")
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        if assigned.len() as u64 != CANARY {
            bail!("round {round}: {} assigned, not {CANARY}", assigned.len());
        }
        // Each hears its assignment and starts downloading.
        let mut heard = 0;
        while heard < assigned.len() {
            let r = runtime
                .block_on(tokio::time::timeout(Duration::from_secs(10), rx.recv()))
                .context("no assignment within 10 s")?
                .context("vehicles gone")?;
            if r.command.action == OtaAction::Install && assigned.contains(&r.vehicle) {
                heard += 1;
                runtime.block_on(report(
                    &clients[&r.vehicle],
                    &topics,
                    &r.vehicle,
                    OtaPhase::Download,
                    OtaOutcome::Started,
                ))?;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let failing = &assigned[0];
        let start = Instant::now();
        runtime.block_on(report(
            &clients[failing],
            &topics,
            failing,
            OtaPhase::Install,
            OtaOutcome::Failed,
        ))?;
        let mut arrivals = Vec::new();
        while arrivals.len() < assigned.len() {
            let r = runtime
                .block_on(tokio::time::timeout(Duration::from_secs(10), rx.recv()))
                .context("no rollback within 10 s")?
                .context("vehicles gone")?;
            if r.command.action == OtaAction::Rollback && assigned.contains(&r.vehicle) {
                arrivals.push(r.at.duration_since(start));
            }
        }
        to_first.push(*arrivals.iter().min().expect("five arrivals"));
        to_all.push(*arrivals.iter().max().expect("five arrivals"));
        // Back to N-1 everywhere, and the rollout closed for the next round.
        for v in &assigned {
            runtime.block_on(report(
                &clients[v],
                &topics,
                v,
                OtaPhase::Rollback,
                OtaOutcome::Succeeded,
            ))?;
        }
        let response = http()
            .post(depot.url(&format!("/api/v1/rollouts/{id}/rollback")))
            .bearer_auth(&depot.token)
            .send()?;
        if !response.status().is_success() {
            bail!("rolling back {id}: {}", response.text()?);
        }
        while let Ok(extra) = rx.try_recv() {
            drop(extra);
        }
    }

    println!("## Canary benchmark\n");
    println!("{}\n", machine());
    println!(
        "{rounds} rounds; canary of {CANARY} of {VEHICLES} vehicles (embedded broker, release build); from one failed-install report to the rollback commands received by the vehicles.\n"
    );
    println!("| measure | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, mut samples) in [
        ("to the first rollback command", to_first),
        ("to all five rollback commands", to_all),
    ] {
        samples.sort();
        let q = |p: f64| {
            let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            q(0.5),
            q(0.95),
            q(0.99),
            q(1.0)
        );
    }
    Ok(())
}

fn wait_until(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

async fn report(
    client: &AsyncClient,
    topics: &Topics,
    vehicle: &str,
    phase: OtaPhase,
    outcome: OtaOutcome,
) -> Result<()> {
    let report = OtaReport {
        version: "2.0.0".into(),
        phase,
        outcome,
        bytes_done: None,
        bytes_total: None,
        error: (outcome == OtaOutcome::Failed).then(|| "bench: write failed".into()),
        ts_ms: now_ms(),
    };
    client
        .publish(
            topics.upward(vehicle, Upward::Ota),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&report)?,
        )
        .await?;
    Ok(())
}

/// Connects the vehicles: each subscribes to its commands and reports itself docked, plugged
/// in and staying for hours; commands go to `tx` with the time they arrived.
async fn connect(
    logins: &[(String, String)],
    broker: std::net::SocketAddr,
    topics: &Topics,
    tx: mpsc::UnboundedSender<Received>,
) -> Result<HashMap<String, AsyncClient>> {
    let mut clients = HashMap::new();
    for (i, (id, password)) in logins.iter().enumerate() {
        let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        options.set_credentials(id, password);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (tx, who) = (tx.clone(), id.clone());
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = Instant::now();
                        if let Ok(command) = serde_json::from_slice::<OtaCommand>(&p.payload) {
                            let _ = tx.send(Received {
                                vehicle: who.clone(),
                                command,
                                at,
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("{who}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("a vehicle did not connect")??;
        client
            .subscribe(topics.downward_filter(id), QoS::AtLeastOnce)
            .await?;
        let publish = |kind: Upward, body: Vec<u8>, retain: bool| {
            client.publish(topics.upward(id, kind), QoS::AtLeastOnce, retain, body)
        };
        publish(
            Upward::Link,
            serde_json::to_vec(&Link { online: true })?,
            true,
        )
        .await?;
        let dock = Dock {
            docked: true,
            bay: Some(format!("bay-{}", i + 1)),
            ts_ms: now_ms(),
        };
        publish(Upward::Dock, serde_json::to_vec(&dock)?, true).await?;
        let state = State {
            soc_percent: 80.0,
            battery_kwh: 82.0,
            plugged_in: true,
            departure_ms: Some(now_ms() + 10 * 3_600_000),
            installed_version: "1.0.0".into(),
            slot: Slot::A,
            free_bytes: 8 << 30,
            ts_ms: now_ms(),
        };
        publish(Upward::State, serde_json::to_vec(&state)?, false).await?;
        clients.insert(id.clone(), client);
    }
    Ok(clients)
}
