//! The depot as a system service: once it serves, it tests itself through its own listener,
//! tells systemd it is ready (and then feeds the watchdog), and confirms the boot slot it runs
//! from, so a trial boot after `atlasmesh image install` becomes permanent only when the new
//! system really works. A depot that fails its self-test never marks the slot good, and the
//! next boot falls back to the previous slot.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use atlasmesh_image::bootenv::{Slot, booted_slot};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Outcome};
use crate::config::ImageConfig;
use crate::store::{Store, unix_ms};

/// How long the self-test waits for the depot's own health endpoint to answer.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What the boot-slot step did, for logs and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootOutcome {
    /// No boot environment here (not installed from the appliance image).
    Off(String),
    AlreadyGood(Slot),
    MarkedGood(Slot),
}

/// Marks the slot the kernel says it booted as good. Blocking (runs the bootloader's
/// environment tool).
pub fn mark_good(config: &ImageConfig) -> anyhow::Result<BootOutcome> {
    let file = config.boot_env_file();
    if !file.exists() {
        return Ok(BootOutcome::Off(format!(
            "{} does not exist",
            file.display()
        )));
    }
    let slot = booted(&config.cmdline)?;
    let env = config.boot_env();
    let state = env.state()?;
    let mut marked = state.clone();
    marked.mark_good(slot);
    if marked == state {
        return Ok(BootOutcome::AlreadyGood(slot));
    }
    env.store(&marked)?;
    Ok(BootOutcome::MarkedGood(slot))
}

/// The booted slot, from the kernel command line.
pub fn booted(cmdline: &Path) -> anyhow::Result<Slot> {
    let text = std::fs::read_to_string(cmdline)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", cmdline.display()))?;
    booted_slot(&text).ok_or_else(|| {
        anyhow::anyhow!(
            "{} has no atlasmesh.slot=A|B: this system was not booted by the appliance's bootloader",
            cmdline.display()
        )
    })
}

/// Runs after the listener is bound: self-test, readiness, watchdog, boot slot.
pub fn spawn(
    store: Store,
    config: ImageConfig,
    http_addr: SocketAddr,
    tls: bool,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        if let Err(reason) = self_test(http_addr, tls, &shutdown).await {
            if !shutdown.is_cancelled() {
                tracing::error!(%reason, "start-up self-test failed: not reporting ready, and not marking the boot slot good");
            }
            return;
        }
        tracing::info!("start-up self-test passed");
        notify(&[sd_notify::NotifyState::Ready]);
        spawn_watchdog(shutdown.clone());

        let outcome = tokio::task::spawn_blocking(move || mark_good(&config)).await;
        let (outcome, detail) = match outcome {
            Ok(Ok(BootOutcome::Off(why))) => {
                tracing::debug!(%why, "boot-slot control is off");
                return;
            }
            Ok(Ok(BootOutcome::AlreadyGood(slot))) => {
                tracing::info!(%slot, "running from boot slot {slot}, already marked good");
                return;
            }
            Ok(Ok(BootOutcome::MarkedGood(slot))) => {
                tracing::info!(%slot, "self-test passed on boot slot {slot}: marked good, it keeps booting");
                (Outcome::Ok, serde_json::json!({"slot": slot.letter()}))
            }
            Ok(Err(e)) => {
                tracing::error!(error = %crate::stdio::causes(e.as_ref()), "could not mark the boot slot good; the next boot falls back to the previous slot");
                (
                    Outcome::Failed,
                    serde_json::json!({"error": crate::stdio::causes(e.as_ref())}),
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "the mark-good task failed");
                return;
            }
        };
        let entry = audit::Entry {
            actor: "system".into(),
            role: None,
            action: "image.mark_good".into(),
            target: Some("boot slot".into()),
            outcome,
            request_id: None,
            detail,
        };
        let now = unix_ms(std::time::SystemTime::now());
        if let Err(e) = store.write(move |tx| audit::record(tx, &entry, now)).await {
            tracing::error!(error = %e, "could not write audit record");
        }
    });
}

/// Asks the depot's own `/health/database` through the real listener until it answers 200.
async fn self_test(
    addr: SocketAddr,
    tls: bool,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let host = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    };
    let url = format!(
        "{}://{host}/health/database",
        if tls { "https" } else { "http" }
    );
    // The depot's own certificate is often self-signed; this client only ever talks to it.
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + SELF_TEST_TIMEOUT;
    let mut last = String::from("no answer");
    while tokio::time::Instant::now() < deadline {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("{url} answered {}", r.status()),
            Err(e) => last = format!("{url}: {e}"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Err("shutting down".into()),
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    Err(last)
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd there is no NOTIFY_SOCKET and this does nothing.
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// The watchdog interval systemd asks for, as libsystemd's `sd_watchdog_enabled` reads it:
/// `WATCHDOG_USEC`, unless `WATCHDOG_PID` names another process. (The sd-notify crate also
/// requires `WATCHDOG_PID` to be set, which systemd does not promise.)
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then_some(usec)
}

/// Feeds systemd's watchdog at half its interval from the async runtime, so a wedged runtime
/// stops the pings and systemd restarts the depot.
fn spawn_watchdog(shutdown: CancellationToken) {
    let Some(usec) = watchdog_usec() else {
        return;
    };
    let period = Duration::from_micros(usec / 2);
    tracing::info!(?period, "feeding the systemd watchdog");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    notify(&[sd_notify::NotifyState::Stopping]);
                    return;
                }
                _ = tick.tick() => notify(&[sd_notify::NotifyState::Watchdog]),
            }
        }
    });
}
