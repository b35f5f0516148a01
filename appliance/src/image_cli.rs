//! `atlasmesh image ...`: the appliance image tools for field engineers and for the appliance
//! itself. The work is in the `atlasmesh-image` crate; this module reads arguments and
//! configuration, shows progress and prints summaries.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Mutex;

use anyhow::Context;
use atlasmesh_image::bmap::human_bytes;
use atlasmesh_image::bootenv::Slot;
use atlasmesh_image::build::{BuildOptions, build as build_image, sidecars};
use atlasmesh_image::device::{SystemView, Target};
use atlasmesh_image::flash::{FileVerify, FlashError, Progress, Quiet, flash as flash_image};
use atlasmesh_image::install::{InstallReport, Slots, check_bundle, install as install_image};
use atlasmesh_image::manifest::Trust;
use atlasmesh_ota_staging::keys::KeyPair;
use indicatif::{ProgressBar, ProgressStyle};

use serde_json::json;

use crate::audit::Outcome;
use crate::cli::{ImageBuildArgs, ImageCommand, ImageFlashArgs, ImageInstallArgs, ImageSlotArgs};
use crate::config::Config;

pub fn run(command: ImageCommand) -> anyhow::Result<u8> {
    match command {
        ImageCommand::Build(args) => build(args),
        ImageCommand::Flash(args) => flash(args),
        ImageCommand::Install(args) => install(args),
        ImageCommand::MarkGood(args) => mark_good(args),
        ImageCommand::Status(args) => status(args),
    }
}

/// A progress bar on stderr, only when stderr is a terminal.
struct Bar(Mutex<Option<ProgressBar>>);

impl Bar {
    fn new() -> Self {
        Self(Mutex::new(None))
    }
}

impl Progress for Bar {
    fn begin(&self, phase: &str, total: u64) {
        let bar = ProgressBar::new(total).with_message(phase.to_owned());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>16} [{bar:36}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(bar);
        }
    }
    fn advance(&self, bytes: u64) {
        if let Ok(slot) = self.0.lock()
            && let Some(bar) = &*slot
        {
            bar.inc(bytes);
        }
    }
    fn end(&self) {
        if let Ok(mut slot) = self.0.lock()
            && let Some(bar) = slot.take()
        {
            bar.finish();
        }
    }
}

fn progress(disabled: bool) -> Box<dyn Progress> {
    if !disabled && std::io::stderr().is_terminal() {
        Box::new(Bar::new())
    } else {
        Box::new(Quiet)
    }
}

fn build(args: ImageBuildArgs) -> anyhow::Result<u8> {
    let key = KeyPair::load(&args.key)?;
    let report = build_image(&BuildOptions {
        rootfs: args.rootfs,
        out: args.out,
        esp_dir: args.esp_dir,
        esp_size: args.esp_size,
        root_size: args.root_size,
        data_size: args.data_size,
        tools: atlasmesh_image::build::Tools {
            mkfs_ext4: args.mkfs_ext4,
            ..Default::default()
        },
        key,
        now: chrono::Utc::now(),
    })?;
    let body = &report.body;
    crate::outln!(
        "built {} ({}, {} mapped)",
        report.image.display(),
        human_bytes(body.image_size),
        human_bytes(body.mapped_bytes)
    )?;
    for p in &body.partitions {
        crate::outln!(
            "  {:<7} {:>5} at {:>10}  {:<11} {}",
            p.name,
            p.filesystem,
            human_bytes(p.offset),
            human_bytes(p.size),
            p.uuid
        )?;
    }
    crate::outln!("  image sha256 {}", body.image_sha256)?;
    crate::outln!("  bmap         {}", report.bmap.display())?;
    crate::outln!(
        "  manifest     {} (signed by {})",
        report.manifest.display(),
        args.key.display()
    )?;
    Ok(0)
}

fn trust(root: &std::path::Path) -> anyhow::Result<Trust> {
    let bytes = std::fs::read(root)
        .with_context(|| format!("reading the fleet root {}", root.display()))?;
    Trust::from_fleet_root(&bytes).with_context(|| format!("fleet root {}", root.display()))
}

fn flash(args: ImageFlashArgs) -> anyhow::Result<u8> {
    let trust = trust(&args.root)?;
    let (default_bmap, default_manifest) = sidecars(&args.image);
    let bmap = args.bmap.unwrap_or(default_bmap);
    let manifest = args.manifest.unwrap_or(default_manifest);
    let preset = args.confirm.clone();
    let mut confirm = |target: &Target| -> Result<String, FlashError> {
        if let Some(typed) = &preset {
            return Ok(typed.clone());
        }
        let word = target.confirmation_word();
        let what = if target.serial.is_some() {
            "serial"
        } else {
            "kernel name"
        };
        if !std::io::stdin().is_terminal() {
            return Err(FlashError::NotConfirmed(format!(
                "{} is larger than 128 GB; pass --confirm with its {what} to write it",
                target.describe()
            )));
        }
        crate::errln!(
            "{} is larger than 128 GB: it may be a computer's own disk rather than the garage PC's.",
            target.describe()
        );
        crate::err!("Type its {what} ({word}) to erase it and write the image: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| FlashError::NotConfirmed(e.to_string()))?;
        Ok(line.trim().to_owned())
    };
    let progress = progress(args.no_progress);
    let report = flash_image(
        &args.image,
        &bmap,
        &manifest,
        &args.device,
        &trust,
        &SystemView::default(),
        &mut confirm,
        if args.verify_on_disk {
            FileVerify::OnDisk
        } else {
            FileVerify::Written
        },
        progress.as_ref(),
    )?;
    let w = &report.write;
    crate::outln!(
        "flashed {} onto {}",
        args.image.display(),
        report.target.describe()
    )?;
    crate::outln!(
        "  written  {} of the {} image (mapped blocks only), each range read back {}and verified",
        human_bytes(w.bytes_written),
        human_bytes(report.image_size),
        if report.read_back_from_disk {
            "from the disk "
        } else {
            ""
        }
    )?;
    let phases = match (report.checked_in, report.read_back_from_disk) {
        (Some(checked), _) => format!(
            "checked in {:.2} s, then written, synced and verified in {:.2} s",
            checked.as_secs_f64(),
            w.elapsed.as_secs_f64()
        ),
        (None, true) => format!(
            "written, checked while syncing and verified on disk in {:.2} s",
            w.elapsed.as_secs_f64()
        ),
        (None, false) => format!(
            "written and checked while syncing, verified in {:.2} s",
            w.elapsed.as_secs_f64()
        ),
    };
    crate::outln!("  speed    {:.1} MB/s ({phases})", w.speed() / 1e6)?;
    crate::outln!(
        "  serial   {}",
        report.target.serial.as_deref().unwrap_or("(none reported)")
    )?;
    crate::outln!(
        "  image    sha256 {} (signed manifest)",
        report.image_sha256
    )?;
    for path in &report.abandoned {
        crate::outln!(
            "  removed  {} (left by a flash that was stopped)",
            path.display()
        )?;
    }
    Ok(0)
}

fn install(args: ImageInstallArgs) -> anyhow::Result<u8> {
    let config = Config::load(&args.common.overrides())?;
    let result = install_checked(&args, &config);
    let bundle = args.bundle.display().to_string();
    let (outcome, detail) = match &result {
        Ok((report, _)) => (
            Outcome::Ok,
            json!({"bundle": bundle, "slot": report.slot.letter(), "bytes": report.bytes_written,
                   "slot_sha256": report.slot_sha256}),
        ),
        Err(e) => (
            Outcome::Failed,
            json!({"bundle": bundle, "error": crate::stdio::causes(e.as_ref())}),
        ),
    };
    audit_change(&config, "image.install", outcome, detail);
    let (report, booted) = result?;
    tracing::info!(slot = %report.slot, image = %args.bundle.display(), "installed an update into the inactive slot");
    crate::outln!(
        "installed {} into slot {} ({}): {} written, verified (sha256 {}) in {:.1} s",
        args.bundle.display(),
        report.slot,
        report.path.display(),
        human_bytes(report.bytes_written),
        report.slot_sha256,
        report.seconds
    )?;
    crate::outln!(
        "slot {} is armed for one trial boot; reboot to try it. The depot marks it good after its self-test; otherwise the next boot returns to slot {}.",
        report.slot,
        booted
    )?;
    Ok(0)
}

/// Checks the bundle against the fleet's trust and writes it into the inactive slot; returns
/// what was written and the slot running now.
fn install_checked(
    args: &ImageInstallArgs,
    config: &Config,
) -> anyhow::Result<(InstallReport, Slot)> {
    let trust = match &args.root {
        Some(root) => trust(root)?,
        None => {
            let bytes = crate::ota::pinned_fleet_root(&config.data_dir).with_context(|| {
                format!(
                    "this depot ({}) has no fleet root pinned; pass --root FILE",
                    config.data_dir.display()
                )
            })?;
            Trust::from_fleet_root(&bytes).context("the pinned fleet root")?
        }
    };
    let booted = crate::boot::booted(&config.image.cmdline)?;
    let env = config.image.boot_env();
    let progress = progress(args.no_progress);
    let checked = check_bundle(&args.bundle, &trust, progress.as_ref())?;
    let slots = Slots {
        a: config.image.slot_a.clone(),
        b: config.image.slot_b.clone(),
    };
    let report = install_image(
        &checked,
        booted,
        &slots,
        env.as_ref(),
        std::path::Path::new("/proc/self/mountinfo"),
        progress.as_ref(),
    )?;
    Ok((report, booted))
}

fn mark_good(args: ImageSlotArgs) -> anyhow::Result<u8> {
    let config = Config::load(&args.common.overrides())?;
    let result = crate::boot::mark_good(&config.image);
    match &result {
        Ok(crate::boot::BootOutcome::MarkedGood(slot)) => audit_change(
            &config,
            "image.mark_good",
            Outcome::Ok,
            json!({"slot": slot.letter()}),
        ),
        Ok(_) => {} // nothing changed
        Err(e) => audit_change(
            &config,
            "image.mark_good",
            Outcome::Failed,
            json!({"error": crate::stdio::causes(e.as_ref())}),
        ),
    }
    match result? {
        crate::boot::BootOutcome::Off(why) => {
            anyhow::bail!("no boot environment to mark: {why}")
        }
        crate::boot::BootOutcome::AlreadyGood(slot) => {
            crate::outln!("slot {slot} is already good")?
        }
        crate::boot::BootOutcome::MarkedGood(slot) => {
            crate::outln!("slot {slot} marked good; it keeps booting")?
        }
    }
    Ok(0)
}

/// Records a boot-slot change in the depot's audit trail, as the depot does for its own
/// mark-good. The change has happened (or failed) either way, so a trail that cannot be
/// written is reported, not turned into the command's failure.
fn audit_change(config: &Config, action: &str, outcome: Outcome, detail: serde_json::Value) {
    match crate::tools::record_cli_change(
        &config.data_dir,
        action,
        Some("boot slot".into()),
        outcome,
        detail,
    ) {
        Ok(true) => {}
        Ok(false) => crate::errln!(
            "note: no depot store in {} yet, so this {action} is not in the audit trail",
            config.data_dir.display()
        ),
        Err(e) => {
            crate::errln!(
                "warning: could not write the audit record for this {action}: {}",
                crate::stdio::causes(&e)
            )
        }
    }
}

fn status(args: ImageSlotArgs) -> anyhow::Result<u8> {
    let config = Config::load(&args.common.overrides())?;
    let env = config.image.boot_env();
    let state = env.state()?;
    let booted = crate::boot::booted(&config.image.cmdline).ok();
    crate::outln!("boot environment: {}", env.describe())?;
    crate::outln!(
        "running slot:     {}",
        booted.map_or(
            "unknown (not booted by the appliance's bootloader)".into(),
            |s| s.to_string()
        )
    )?;
    let order: Vec<&str> = state.order.iter().map(|s| s.letter()).collect();
    crate::outln!("order:            {}", order.join(" "))?;
    for (slot, path) in [
        (atlasmesh_image::bootenv::Slot::A, &config.image.slot_a),
        (atlasmesh_image::bootenv::Slot::B, &config.image.slot_b),
    ] {
        crate::outln!(
            "slot {slot} ({}): {}{}",
            path.display(),
            if state.is_good(slot) {
                "good"
            } else {
                "not good"
            },
            if state.is_armed(slot) {
                ", armed for one trial boot"
            } else {
                ""
            }
        )?;
    }
    let next = state.clone().boot();
    crate::outln!("next boot:        slot {next}")?;
    Ok(0)
}
