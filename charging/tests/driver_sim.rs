//! The driver against the simulated devices, over real TCP: every shipped profile reads,
//! writes and keeps alive through the same register map. (The profiles are checked against an
//! independent Modbus implementation, pymodbus, in the workspace's end-to-end tests.)

use std::sync::Arc;
use std::time::Duration;

use atlasmesh_charging::driver::{Device, DriverError};
use atlasmesh_charging::profile::{self, IecState, Kind, Profile};
use atlasmesh_charging::sim::{SimDevice, SimVehicle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn serve(device: SimDevice, stop: &CancellationToken) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(device.serve(listener, stop.clone()));
    addr
}

fn car() -> SimVehicle {
    SimVehicle {
        soc_percent: 40.0,
        battery_kwh: 80.0,
        max_kw: 22.0,
    }
}

#[tokio::test]
async fn every_shipped_profile_reads_and_writes_through_its_own_register_map() {
    let stop = CancellationToken::new();
    for (name, text) in profile::BUILTIN {
        let profile = Arc::new(Profile::parse(text).unwrap());
        let sim = SimDevice::new(profile.clone(), Some(car()));
        let addr = serve(sim.clone(), &stop).await;
        let mut device = Device::connect(
            addr,
            profile.device.unit_id,
            profile.clone(),
            Duration::from_secs(2),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        if profile.device.kind == Kind::Meter {
            sim.with(|s| s.base_load_w = 43_210.0);
            let r = device
                .poll()
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            // SunSpec integer points carry 10 W resolution in the simulator.
            assert!((r.power_w - 43_210.0).abs() <= 10.0, "{name}: {r:?}");
            continue;
        }
        device.configure_failsafe().await.unwrap();
        device
            .set_current(16.0)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let applied = sim.with(|s| (s.applied_a, s.power_w));
        assert!(
            (applied.0 - 16.0).abs() < 0.01,
            "{name}: applied {applied:?}"
        );
        assert!(
            (applied.1 - profile.watts(16.0)).abs() < 1.0,
            "{name}: {applied:?}"
        );
        let r = device.poll().await.unwrap();
        assert_eq!(r.state, Some(IecState::C), "{name}: {r:?}");
        assert!(r.plugged && r.charging && !r.fault, "{name}: {r:?}");
        // Scaled registers (0.01 kW, mW) lose nothing that matters at 11 kW.
        assert!(
            (r.power_w - profile.watts(16.0)).abs() < 10.0,
            "{name}: {r:?}"
        );
        device.life_bit().await.unwrap();

        device.set_current(0.0).await.unwrap();
        let r = device.poll().await.unwrap();
        assert_eq!(r.state, Some(IecState::B), "{name}: paused: {r:?}");
        assert_eq!(r.power_w, 0.0, "{name}");
        sim.plug(None);
        let r = device.poll().await.unwrap();
        assert_eq!(r.state, Some(IecState::A), "{name}: unplugged: {r:?}");
        assert!(!r.plugged, "{name}");
    }
    stop.cancel();
}

#[tokio::test]
async fn a_charger_left_without_keep_alive_falls_back_to_its_failsafe_current() {
    let text = profile::builtin("alfen-ng9xx").unwrap().unwrap();
    let mut profile = text;
    profile.keep_alive.as_mut().unwrap().interval = Duration::from_secs(1);
    profile.failsafe.as_mut().unwrap().timeout = Duration::from_millis(1500);
    let profile = Arc::new(profile);
    let stop = CancellationToken::new();
    let sim = SimDevice::new(profile.clone(), Some(car()));
    let addr = serve(sim.clone(), &stop).await;
    let mut device = Device::connect(addr, 1, profile.clone(), Duration::from_secs(2))
        .await
        .unwrap();
    device.set_current(20.0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    device.set_current(20.0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        sim.with(|s| (s.failsafe, s.applied_a)),
        (false, 20.0),
        "kept alive"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        sim.with(|s| (s.failsafe, s.applied_a)),
        (true, 6.0),
        "fell back"
    );
    stop.cancel();
}

#[tokio::test]
async fn an_unreachable_or_silent_device_is_a_typed_error_not_a_hang() {
    // Nothing listens here.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let profile = Arc::new(profile::builtin("keba-p30").unwrap().unwrap());
    let err = Device::connect(closed, 255, profile.clone(), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unreachable", "{err}");

    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut device = Device::connect(addr, 255, profile, Duration::from_millis(300))
        .await
        .unwrap();
    let err = device.poll().await.unwrap_err();
    assert!(matches!(err, DriverError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().starts_with("status: no reply within 300ms"),
        "{err}"
    );
}
