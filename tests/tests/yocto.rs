//! The Yocto layer, `yocto/meta-atlasmesh`: clean under oelint-adv, its crates include in step
//! with Cargo.lock, its GRUB script the one `atlasmesh image build` installs, and its systemd
//! unit starting the binary where the recipe installs it. Nothing here runs BitBake.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use atlasmesh_tests::workspace_root;

fn layer() -> PathBuf {
    workspace_root().join("yocto/meta-atlasmesh")
}

fn recipe_dir() -> PathBuf {
    layer().join("recipes-atlasmesh/atlasmesh")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every BitBake file of the layer (recipes, appends, includes, configuration, classes).
fn bitbake_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            bitbake_files(&path, out);
        } else if path.extension().is_some_and(|e| {
            ["bb", "bbappend", "inc", "conf", "bbclass"].contains(&e.to_str().unwrap_or(""))
        }) {
            out.push(path);
        }
    }
}

#[test]
fn oelint_adv_finds_nothing_in_the_layer() {
    // tests/run installs oelint-adv (tests/requirements.txt); ATLASMESH_OELINT points at
    // another installation.
    let oelint = std::env::var_os("ATLASMESH_OELINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("tests/.venv/bin/oelint-adv"));
    assert!(
        oelint.is_file(),
        "{} is missing: run tests/run, which installs tests/requirements.txt into tests/.venv",
        oelint.display()
    );
    let mut files = Vec::new();
    bitbake_files(&layer(), &mut files);
    files.sort();
    assert!(files.len() >= 4, "the layer's BitBake files: {files:?}");

    let output = Command::new(&oelint)
        // The release the layer is for (LAYERSERIES_COMPAT), and only the rules' defaults:
        // no .oelint.cfg from the working directory or $HOME.
        .args(["--quiet", "--release", "wrynose"])
        .args(&files)
        .current_dir(layer())
        .env("OELINT_SKIP_CONFIG", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", oelint.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && report.trim().is_empty(),
        "oelint-adv ({}) on the layer:\n{report}",
        output.status
    );
}

#[test]
fn crates_include_is_the_one_update_crates_inc_makes_from_cargo_lock() {
    let script = workspace_root().join("yocto/update-crates-inc");
    let output = Command::new(&script)
        .arg("--check")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn crates_include_fetches_every_crates_io_package_of_cargo_lock_with_its_checksum() {
    let lock: toml::Value = toml::from_str(&read(&workspace_root().join("Cargo.lock"))).unwrap();
    let mut expected = BTreeMap::new();
    for package in lock["package"].as_array().unwrap() {
        let source = package.get("source").and_then(|s| s.as_str()).unwrap_or("");
        if source.contains("crates.io") {
            let key = format!(
                "{}-{}",
                package["name"].as_str().unwrap(),
                package["version"].as_str().unwrap()
            );
            let uri = format!(
                "crate://crates.io/{}/{}",
                package["name"].as_str().unwrap(),
                package["version"].as_str().unwrap()
            );
            expected.insert(key, (uri, package["checksum"].as_str().unwrap().to_owned()));
        }
    }
    assert!(
        expected.len() > 100,
        "crates.io packages in Cargo.lock: {}",
        expected.len()
    );

    let inc = read(&recipe_dir().join("atlasmesh-crates.inc"));
    let uris: Vec<&str> = inc
        .lines()
        .map(|l| l.trim().trim_end_matches('\\').trim())
        .filter(|l| l.starts_with("crate://"))
        .collect();
    let mut checksums = BTreeMap::new();
    for line in inc.lines().filter(|l| l.starts_with("SRC_URI[")) {
        let (key, value) = line.split_once("] = ").unwrap();
        let key = key
            .trim_start_matches("SRC_URI[")
            .trim_end_matches(".sha256sum");
        checksums.insert(key.to_owned(), value.trim_matches('"').to_owned());
    }

    let expected_uris: Vec<&str> = expected.values().map(|(uri, _)| uri.as_str()).collect();
    let mut sorted_uris = uris.clone();
    sorted_uris.sort_unstable();
    let mut sorted_expected = expected_uris.clone();
    sorted_expected.sort_unstable();
    assert_eq!(
        sorted_uris, sorted_expected,
        "crate:// entries against Cargo.lock"
    );
    let expected_sums: BTreeMap<String, String> =
        expected.into_iter().map(|(k, (_, sum))| (k, sum)).collect();
    assert_eq!(
        checksums, expected_sums,
        "sha256sum flags against Cargo.lock's checksums"
    );
}

#[test]
fn wic_grub_script_is_the_one_atlasmesh_image_build_installs() {
    let ours = workspace_root().join("image/grub/grub.cfg");
    let layer_copy = layer().join("files/wic/grub-atlasmesh.cfg");
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&layer_copy).unwrap(),
    );
    assert!(
        a == b,
        "{} differs from {}: copy it (cp {} {})",
        layer_copy.display(),
        ours.display(),
        ours.display(),
        layer_copy.display()
    );
    let wks = read(&layer().join("files/wic/atlasmesh-ab.wks"));
    assert!(wks.contains("--configfile=\"grub-atlasmesh.cfg\""), "{wks}");
}

/// `install ... ${D}<dir>/<name>` in the recipe's do_install, with OE-core's default paths.
fn installed_path(recipe: &str, name: &str) -> String {
    let line = recipe
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("install ") && l.ends_with(&format!("/{name}")))
        .unwrap_or_else(|| panic!("the recipe installs no {name}"));
    let dest = line.split_whitespace().last().unwrap();
    dest.trim_start_matches("${D}")
        .replace("${bindir}", "/usr/bin")
        .replace("${sysconfdir}", "/etc")
        .replace("${systemd_system_unitdir}", "/usr/lib/systemd/system")
}

#[test]
fn unit_is_a_watched_notify_service_starting_the_installed_binary_with_the_installed_config() {
    let unit_name = "atlasmesh-depot.service";
    let unit = read(&recipe_dir().join("files").join(unit_name));
    let recipe = read(&recipe_dir().join("atlasmesh_git.bb"));
    let setting = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{unit_name} has no {key}="))
            .to_owned()
    };

    assert_eq!(setting("Type"), "notify");
    assert!(!setting("WatchdogSec").is_empty());
    let exec_start = setting("ExecStart");
    let args: Vec<&str> = exec_start.split_whitespace().collect();
    assert_eq!(
        args[0],
        installed_path(&recipe, "atlasmesh"),
        "ExecStart={exec_start}"
    );
    assert_eq!(args[1], "depot", "ExecStart={exec_start}");
    let config = args
        .iter()
        .position(|a| *a == "--config")
        .map(|i| args[i + 1]);
    assert_eq!(
        config,
        Some(installed_path(&recipe, "depot.toml").as_str()),
        "ExecStart={exec_start}"
    );
    assert!(
        recipe.contains(&format!("SYSTEMD_SERVICE:${{PN}} = \"{unit_name}\"")),
        "{recipe}"
    );
    assert_eq!(
        installed_path(&recipe, unit_name),
        format!("/usr/lib/systemd/system/{unit_name}")
    );
}

#[test]
fn the_shipped_configuration_is_one_the_binary_accepts() {
    let config = recipe_dir().join("files/depot.toml");
    let (status, stdout, stderr) = atlasmesh_tests::run(
        atlasmesh_tests::atlasmesh()
            .args(["depot", "--print-config", "--config"])
            .arg(&config),
    )
    .unwrap();
    assert!(status.success(), "{stderr}");
    let effective: toml::Value = toml::from_str(&stdout).unwrap();
    assert_eq!(effective["data_dir"].as_str(), Some("/data/atlasmesh"));
    assert_eq!(
        effective["image"]["grubenv"].as_str(),
        Some("/boot/EFI/BOOT/grubenv")
    );
    assert_eq!(
        effective["image"]["slot_b"].as_str(),
        Some("/dev/disk/by-partlabel/root_b")
    );
}
