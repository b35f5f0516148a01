//! The OTA command-line tools: release engineering (`release ...`), staging on a running depot
//! (`stage`), and the reference vehicle client (`vehicle pull`). They print results as JSON on
//! stdout and progress on stderr.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use atlasmesh_ota_staging::certificate::DepotCertificate;
use atlasmesh_ota_staging::keys::KeyPair;
use atlasmesh_ota_staging::meta::{self, ImageMeta};
use atlasmesh_ota_staging::release::{self, Expiries, Keys, RotatedRole};
use atlasmesh_ota_staging::time::SystemClock;
use atlasmesh_vehicle_link::ota::{Outcome, PullConfig, PullError};
use serde_json::json;

use crate::cli::{ExpiryArgs, ReleaseCommand, StageArgs, VehiclePullArgs};

fn expiries(args: &ExpiryArgs) -> Expiries {
    Expiries {
        root: args.root_expires,
        targets: args.targets_expires,
        snapshot: args.snapshot_expires,
        timestamp: args.timestamp_expires,
    }
}

fn print(value: serde_json::Value) -> Result<(), crate::stdio::StdoutError> {
    crate::outln!("{}", serde_json::to_string_pretty(&value).expect("JSON"))
}

pub async fn release(command: ReleaseCommand) -> anyhow::Result<()> {
    let clock = SystemClock;
    match command {
        ReleaseCommand::Keygen { keys, out } => {
            if let Some(out) = out {
                let key = KeyPair::generate();
                key.write_new(&out)?;
                print(json!({"written": [out], "public": key.public_hex()}))?;
            } else if let Some(dir) = keys {
                let written = Keys::generate(&dir)?;
                print(json!({"written": written}))?;
            }
        }
        ReleaseCommand::Init { repo, expiry } => {
            let keys = Keys::load(&repo.keys)?;
            release::init(&repo.repo, &keys, expiries(&expiry), &clock).await?;
            let root = repo.repo.join("metadata/1.root.json");
            crate::errln!(
                "repository created; pin {} on depots (ota.fleet_root) and provision it on vehicles",
                root.display()
            );
            print(json!({"repository": repo.repo, "fleet_root": root}))?;
        }
        ReleaseCommand::Add {
            repo,
            image,
            version,
            hardware,
            min_version,
            notes,
            expiry,
        } => {
            let keys = Keys::load(&repo.keys)?;
            let meta = ImageMeta {
                version,
                hardware_id: hardware,
                min_version,
                notes,
            };
            let added =
                release::add(&repo.repo, &keys, &image, &meta, expiries(&expiry), &clock).await?;
            print(serde_json::to_value(&added)?)?;
        }
        ReleaseCommand::Refresh { repo, expiry } => {
            let keys = Keys::load(&repo.keys)?;
            let version = release::refresh(&repo.repo, &keys, expiries(&expiry), &clock).await?;
            print(json!({"timestamp_version": version}))?;
        }
        ReleaseCommand::Rotate {
            repo,
            role,
            new_key,
            expiry,
        } => {
            let role = RotatedRole::parse(&role).with_context(|| {
                format!("unknown role {role:?}: use root, targets, snapshot or timestamp")
            })?;
            let version = release::rotate(
                &repo.repo,
                &repo.keys,
                role,
                &new_key,
                expiries(&expiry),
                &clock,
            )
            .await?;
            print(json!({"root_version": version}))?;
        }
        ReleaseCommand::CertifyDepot {
            keys,
            depot_id,
            director_root,
            expires,
            out,
        } => {
            crate::config::validate_depot_id(&depot_id).map_err(anyhow::Error::msg)?;
            let certifier = KeyPair::load(&keys.join(format!("{}.pem", release::CERTIFIER_KEY)))?;
            let root = fs::read(&director_root)
                .with_context(|| format!("reading {}", director_root.display()))?;
            let parsed: tough::schema::Signed<tough::schema::Root> = serde_json::from_slice(&root)
                .context("the director root is not TUF root metadata")?;
            if parsed.signed.version.get() != 1 {
                bail!(
                    "certify the director's 1.root.json (this is version {})",
                    parsed.signed.version
                );
            }
            let now = SystemTime::now();
            let cert = DepotCertificate::issue(&certifier, &depot_id, &root, now, now + expires);
            fs::write(&out, cert.to_json())
                .with_context(|| format!("writing {}", out.display()))?;
            print(
                json!({"certificate": out, "depot_id": depot_id, "expires": cert.signed.expires}),
            )?;
        }
        ReleaseCommand::Bundle {
            repo,
            hardware,
            version,
            out,
        } => {
            let written = bundle(&repo, &hardware, &version, &out).await?;
            print(json!({"bundle": out, "bytes": written}))?;
        }
    }
    Ok(())
}

/// Writes a tar: every metadata file, the certifier key, the chunk index, then the image last
/// (so a depot can verify everything before it reads the image).
async fn bundle(repo: &Path, hardware: &str, version: &str, out: &Path) -> anyhow::Result<u64> {
    let loaded = release::load(repo).await?;
    let targets = &loaded.targets().signed.targets;
    let find = |name: &str| -> anyhow::Result<PathBuf> {
        let target = targets
            .get(&tough::TargetName::new(name)?)
            .with_context(|| format!("{name} is not in the repository"))?;
        Ok(release::target_file_path(
            repo,
            name,
            &hex::encode(&*target.hashes.sha256),
        ))
    };
    let image = find(&meta::image_target_name(hardware, version))?;
    let index = find(&meta::index_target_name(hardware, version))?;
    let certifier = find(release::CERTIFIER_TARGET)?;
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut metadata: Vec<PathBuf> = fs::read_dir(repo.join("metadata"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(atlasmesh_ota_staging::staging::is_metadata_name)
        })
        .collect();
    metadata.sort();
    for path in &metadata {
        tar.append_path_with_name(
            path,
            Path::new("metadata").join(path.file_name().expect("file name")),
        )?;
    }
    for path in [&certifier, &index, &image] {
        tar.append_path_with_name(
            path,
            Path::new("targets").join(path.file_name().expect("file name")),
        )?;
    }
    let mut writer = tar.into_inner()?;
    writer.flush()?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

pub async fn stage(args: StageArgs) -> anyhow::Result<()> {
    let base = url::Url::parse(&args.depot).context("--depot is not a URL")?;
    let api = |path: &str| base.join(path).expect("API path");
    let client = reqwest::Client::new();
    let (status, body): (reqwest::StatusCode, serde_json::Value) = if let Some(bundle) =
        &args.bundle
    {
        let file = tokio::fs::File::open(bundle)
            .await
            .with_context(|| format!("opening {}", bundle.display()))?;
        let mut url = api("/api/v1/images");
        if let (Some(h), Some(v)) = (&args.hardware, &args.version) {
            url.query_pairs_mut()
                .append_pair("hardware", h)
                .append_pair("version", v);
        }
        crate::errln!("uploading {} ...", bundle.display());
        let response = client
            .post(url)
            .bearer_auth(&args.token)
            .header("content-type", "application/x-tar")
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::new(file),
            ))
            .send()
            .await
            .context("uploading the bundle")?;
        (response.status(), response.json().await.unwrap_or_default())
    } else if args.metadata_only {
        let request = match (&args.url, &args.dir) {
            (Some(url), None) => json!({"url": url}),
            (None, Some(dir)) => json!({"path": fs::canonicalize(dir).unwrap_or(dir.clone())}),
            _ => bail!("--metadata-only needs one of --url and --dir"),
        };
        let response = client
            .post(api("/api/v1/ota/metadata"))
            .bearer_auth(&args.token)
            .json(&request)
            .send()
            .await
            .context("asking the depot to refresh its metadata")?;
        (response.status(), response.json().await.unwrap_or_default())
    } else {
        let (Some(hardware), Some(version)) = (&args.hardware, &args.version) else {
            bail!("--hardware and --version are required with --url and --dir");
        };
        let request = match (&args.url, &args.dir) {
            (Some(url), None) => json!({"url": url, "hardware": hardware, "version": version}),
            (None, Some(dir)) => {
                json!({"path": fs::canonicalize(dir).unwrap_or(dir.clone()), "hardware": hardware, "version": version})
            }
            _ => bail!("give one of --bundle, --url and --dir"),
        };
        let response = client
            .post(api("/api/v1/images"))
            .bearer_auth(&args.token)
            .json(&request)
            .send()
            .await?;
        let status = response.status();
        let accepted: serde_json::Value = response.json().await.unwrap_or_default();
        if status != reqwest::StatusCode::ACCEPTED {
            (status, accepted)
        } else {
            let job = accepted["job"]
                .as_i64()
                .context("no job id in the answer")?;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let state: serde_json::Value = client
                    .get(api(&format!("/api/v1/staging/{job}")))
                    .bearer_auth(&args.token)
                    .send()
                    .await?
                    .json()
                    .await?;
                match state["state"].as_str() {
                    Some("running") => crate::errln!(
                        "job {job}: {} of {} bytes",
                        state["bytes_done"],
                        state["bytes_total"]
                    ),
                    Some("staged") => break (reqwest::StatusCode::CREATED, state),
                    _ => {
                        break (
                            reqwest::StatusCode::UNPROCESSABLE_ENTITY,
                            json!({"error": {"code": state["error_code"], "message": state["error"]}, "job": state}),
                        );
                    }
                }
            }
        }
    };
    print(body.clone())?;
    if !status.is_success() {
        bail!(
            "the depot refused ({status}): {}",
            body["error"]["message"].as_str().unwrap_or("see above")
        );
    }
    Ok(())
}

/// Exit status for an interrupted pull (EX_TEMPFAIL): try again at the next dock.
pub const EXIT_INTERRUPTED: u8 = 75;

pub async fn vehicle_pull(args: VehiclePullArgs) -> anyhow::Result<u8> {
    atlasmesh_ota_staging::director::validate_vehicle_id(&args.vehicle)
        .map_err(anyhow::Error::msg)?;
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("atlasmesh-vehicle-{}", args.vehicle)));
    fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    if let Some(root) = &args.fleet_root {
        let bytes = fs::read(root).with_context(|| format!("reading {}", root.display()))?;
        crate::datadir::write_private(&state.join("fleet-root.json"), &bytes)?;
    }
    let config = PullConfig {
        depot: url::Url::parse(&args.depot).context("--depot is not a URL")?,
        vehicle_id: args.vehicle,
        state_dir: state,
        slot: args.slot,
        current: args.current,
        hardware_id: args.hardware,
        installed_version: args.installed_version,
        expected_depot: args.depot_id,
        concurrency: args.concurrency,
        stop_after_chunks: args.stop_after_chunks,
    };
    match atlasmesh_vehicle_link::ota::pull(&config).await {
        Ok(report) => {
            let interrupted = matches!(report.outcome, Outcome::Interrupted { .. });
            print(serde_json::to_value(&report)?)?;
            Ok(if interrupted { EXIT_INTERRUPTED } else { 0 })
        }
        Err(e) => {
            print(json!({"error": {"code": e.code(), "message": e.to_string()}}))?;
            Err(refused(e))
        }
    }
}

fn refused(e: PullError) -> anyhow::Error {
    anyhow::anyhow!("pull refused ({}): {e}", e.code())
}
