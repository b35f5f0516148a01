//! A smartctl stand-in for the disk-health tests: a directory holding
//! tests/fixtures/fake-smartctl and the recorded smartctl outputs it prints per device.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::workspace_root;

pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("appliance/tests/fixtures").join(name)
}

/// A directory with the smartctl stand-in and the outputs it prints, per device.
pub struct FakeSmartctl {
    pub dir: tempfile::TempDir,
}

impl FakeSmartctl {
    pub fn new(devices: &[(&str, Option<&str>)]) -> FakeSmartctl {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            workspace_root().join("tests/fixtures/fake-smartctl"),
            dir.path().join("smartctl"),
        )
        .unwrap();
        let scan: Vec<Value> = devices
            .iter()
            .map(|(dev, _)| json!({"name": dev, "info_name": dev, "type": "scsi", "protocol": "SCSI"}))
            .collect();
        std::fs::write(
            dir.path().join("scan.json"),
            json!({"json_format_version": [1, 0], "smartctl": {"version": [7, 3], "exit_status": 0}, "devices": scan})
                .to_string(),
        )
        .unwrap();
        let fake = FakeSmartctl { dir };
        for (dev, source) in devices {
            if let Some(source) = source {
                fake.set(dev, &std::fs::read_to_string(fixture(source)).unwrap());
            }
        }
        fake
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("smartctl")
    }

    pub fn set(&self, dev: &str, output: &str) {
        let name = Path::new(dev).file_name().unwrap().to_str().unwrap();
        // Written whole, then renamed: the collector never reads half a file.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, output).unwrap();
        std::fs::rename(tmp, self.dir.path().join(format!("{name}.json"))).unwrap();
    }

    pub fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls.log")).unwrap_or_default()
    }
}

/// An ATA fixture with attribute 5 (reallocated sectors) at `raw`.
pub fn ata_with_reallocated(raw: u64) -> String {
    let mut v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("smartctl-scrutiny/smart-ata.json")).unwrap(),
    )
    .unwrap();
    for a in v["ata_smart_attributes"]["table"].as_array_mut().unwrap() {
        if a["id"] == 5 {
            a["raw"]["value"] = json!(raw);
            a["raw"]["string"] = json!(raw.to_string());
        }
    }
    v.to_string()
}
