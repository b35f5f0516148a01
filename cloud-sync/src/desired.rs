//! Desired state as the depot and the cloud's API see it: typed objects, their validation, and
//! the conversion from and to the wire. Pure: no I/O.
//!
//! Balena's lesson is kept here: a desired state is applied only when every object in it is
//! known and valid; otherwise the whole revision is refused and the depot keeps what it had.

use serde::{Deserialize, Serialize};

use crate::pb;

/// Quarter-hours in a day: the tariff's resolution.
pub const TARIFF_SLOTS: usize = 96;
/// Above this a site limit is a typo (100 MW), not a depot.
pub const MAX_SITE_LIMIT_KW: f64 = 100_000.0;

/// One desired object's content. The `kind` of the object is the variant's name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Spec {
    /// The depot's grid connection limit, as set by the fleet.
    SiteLimit { limit_kw: f64 },
    /// A time-of-use tariff, 96 prices per kWh for the local quarter-hours from midnight.
    Tariff { prices_per_kwh: Vec<f64> },
    /// An image to stage from the cloud's image repository; the key is `hardware/version`.
    Release {
        hardware_id: String,
        version: String,
        sha256: String,
    },
    /// This depot's part of a fleet rollout; the key is the fleet rollout's id. `action` is
    /// `run`, `pause` or `halt`; `plan` is the depot's own plan for its vehicles (the body of
    /// its `POST /api/v1/rollouts` without the version).
    RolloutSlice {
        fleet_rollout_id: String,
        phase: String,
        hardware_id: String,
        version: String,
        action: String,
        plan: serde_json::Value,
    },
}

/// The actions a rollout slice can say.
pub const SLICE_ACTIONS: [&str; 3] = ["run", "pause", "halt"];

/// The key a release object has: one object per image.
pub fn release_key(hardware_id: &str, version: &str) -> String {
    format!("{hardware_id}/{version}")
}

/// Hardware ids and versions travel in target names and URLs: a short, plain alphabet.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

impl Spec {
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::SiteLimit { .. } => "site_limit",
            Spec::Tariff { .. } => "tariff",
            Spec::Release { .. } => "release",
            Spec::RolloutSlice { .. } => "rollout_slice",
        }
    }

    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Spec::SiteLimit { limit_kw } => {
                if !limit_kw.is_finite() || *limit_kw <= 0.0 || *limit_kw > MAX_SITE_LIMIT_KW {
                    return Err(format!(
                        "site_limit.limit_kw: {limit_kw} is not a limit in kW (0 < limit <= {MAX_SITE_LIMIT_KW})"
                    ));
                }
            }
            Spec::Tariff { prices_per_kwh } => {
                if prices_per_kwh.len() != TARIFF_SLOTS {
                    return Err(format!(
                        "tariff.prices_per_kwh: {} prices given, {TARIFF_SLOTS} quarter-hours needed",
                        prices_per_kwh.len()
                    ));
                }
                if let Some((i, p)) = prices_per_kwh
                    .iter()
                    .enumerate()
                    .find(|(_, p)| !p.is_finite() || **p < 0.0)
                {
                    return Err(format!(
                        "tariff.prices_per_kwh[{i}]: {p} is not a price (finite, not negative)"
                    ));
                }
            }
            Spec::Release {
                hardware_id,
                version,
                sha256,
            } => {
                if !is_name(hardware_id) {
                    return Err(format!(
                        "release.hardware_id: {hardware_id:?} is not a hardware id"
                    ));
                }
                if !is_name(version) {
                    return Err(format!("release.version: {version:?} is not a version"));
                }
                if sha256.len() != 64
                    || !sha256
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(format!(
                        "release.sha256: {sha256:?} is not a SHA-256 in hex"
                    ));
                }
            }
            Spec::RolloutSlice {
                fleet_rollout_id,
                phase,
                hardware_id,
                version,
                action,
                plan,
            } => {
                for (field, value) in [
                    ("fleet_rollout_id", fleet_rollout_id),
                    ("phase", phase),
                    ("hardware_id", hardware_id),
                    ("version", version),
                ] {
                    if !is_name(value) {
                        return Err(format!(
                            "rollout_slice.{field}: {value:?} is not a name (letters, digits, . - +)"
                        ));
                    }
                }
                if !SLICE_ACTIONS.contains(&action.as_str()) {
                    return Err(format!(
                        "rollout_slice.action: {action:?} is not one of run, pause, halt"
                    ));
                }
                if !plan.is_object() {
                    return Err("rollout_slice.plan: not a JSON object".into());
                }
            }
        }
        Ok(())
    }
}

/// One object of a desired revision. `spec` is `None` for a deletion.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredObject {
    pub kind: String,
    pub key: String,
    pub generation: u64,
    pub spec: Option<Spec>,
}

/// A desired revision as received: either the whole state or the changes since the depot's
/// acknowledged revision.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredRevision {
    pub revision: u64,
    pub full: bool,
    pub objects: Vec<DesiredObject>,
}

impl DesiredRevision {
    /// Decodes and validates a revision from the wire, refusing the whole of it on the first
    /// problem. `stored` is the newest revision the depot has stored.
    pub fn from_wire(msg: pb::DesiredState, stored: u64) -> Result<Self, String> {
        if msg.revision == 0 {
            return Err("revision 0 is not a revision".into());
        }
        if msg.revision < stored {
            return Err(format!(
                "revision {} is older than the stored revision {stored}: the cloud's store went back in time",
                msg.revision
            ));
        }
        if !msg.full && msg.base_revision > stored {
            return Err(format!(
                "changes since revision {} cannot apply to the stored revision {stored}",
                msg.base_revision
            ));
        }
        if msg.full && msg.objects.is_empty() {
            return Err("an empty full desired state: refusing to clear every setting".into());
        }
        let mut objects = Vec::with_capacity(msg.objects.len());
        for o in msg.objects {
            let name = format!("{}/{}", o.kind, o.key);
            if o.generation == 0 {
                return Err(format!("{name}: generation 0"));
            }
            let spec = match (o.deleted, o.spec) {
                (true, _) => None,
                (false, None) => return Err(format!("{name}: no content (unknown to this depot)")),
                (false, Some(spec)) => Some(spec_from_wire(spec)),
            };
            let spec = match spec {
                None => None,
                Some(Err(e)) => return Err(format!("{name}: {e}")),
                Some(Ok(spec)) => {
                    if spec.kind() != o.kind {
                        return Err(format!("{name}: content is a {}", spec.kind()));
                    }
                    spec.validate().map_err(|e| format!("{name}: {e}"))?;
                    Some(spec)
                }
            };
            if let Some(Spec::Release {
                hardware_id,
                version,
                ..
            }) = &spec
                && o.key != release_key(hardware_id, version)
            {
                return Err(format!("{name}: a release's key is hardware/version"));
            }
            if let Some(Spec::RolloutSlice {
                fleet_rollout_id, ..
            }) = &spec
                && &o.key != fleet_rollout_id
            {
                return Err(format!(
                    "{name}: a rollout slice's key is its fleet rollout id"
                ));
            }
            if !matches!(
                o.kind.as_str(),
                "site_limit" | "tariff" | "release" | "rollout_slice"
            ) {
                return Err(format!("{name}: unknown kind"));
            }
            objects.push(DesiredObject {
                kind: o.kind,
                key: o.key,
                generation: o.generation,
                spec,
            });
        }
        Ok(Self {
            revision: msg.revision,
            full: msg.full,
            objects,
        })
    }
}

fn spec_from_wire(spec: pb::desired_object::Spec) -> Result<Spec, String> {
    use pb::desired_object::Spec as W;
    match spec {
        W::SiteLimit(s) => Ok(Spec::SiteLimit {
            limit_kw: s.limit_kw,
        }),
        W::Tariff(t) => Ok(Spec::Tariff {
            prices_per_kwh: t.prices_per_kwh,
        }),
        W::Release(r) => Ok(Spec::Release {
            hardware_id: r.hardware_id,
            version: r.version,
            sha256: r.sha256,
        }),
        W::RolloutSlice(r) => Ok(Spec::RolloutSlice {
            fleet_rollout_id: r.fleet_rollout_id,
            phase: r.phase,
            hardware_id: r.hardware_id,
            version: r.version,
            action: r.action,
            plan: serde_json::from_str(&r.plan_json)
                .map_err(|e| format!("rollout_slice.plan: {e}"))?,
        }),
    }
}

/// The wire form of one stored object.
pub fn object_to_wire(
    kind: &str,
    key: &str,
    generation: u64,
    spec: Option<&Spec>,
) -> pb::DesiredObject {
    use pb::desired_object::Spec as W;
    pb::DesiredObject {
        kind: kind.to_owned(),
        key: key.to_owned(),
        generation,
        deleted: spec.is_none(),
        spec: spec.map(|s| match s {
            Spec::SiteLimit { limit_kw } => W::SiteLimit(pb::SiteLimitOverride {
                limit_kw: *limit_kw,
            }),
            Spec::Tariff { prices_per_kwh } => W::Tariff(pb::TariffOverride {
                prices_per_kwh: prices_per_kwh.clone(),
            }),
            Spec::Release {
                hardware_id,
                version,
                sha256,
            } => W::Release(pb::ReleaseToStage {
                hardware_id: hardware_id.clone(),
                version: version.clone(),
                sha256: sha256.clone(),
            }),
            Spec::RolloutSlice {
                fleet_rollout_id,
                phase,
                hardware_id,
                version,
                action,
                plan,
            } => W::RolloutSlice(pb::RolloutSlice {
                fleet_rollout_id: fleet_rollout_id.clone(),
                phase: phase.clone(),
                hardware_id: hardware_id.clone(),
                version: version.clone(),
                action: action.clone(),
                plan_json: plan.to_string(),
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wire(revision: u64, full: bool, objects: Vec<pb::DesiredObject>) -> pb::DesiredState {
        pb::DesiredState {
            revision,
            full,
            objects,
            base_revision: 2,
        }
    }

    fn slice(id: &str, action: &str, plan: serde_json::Value) -> pb::DesiredObject {
        object_to_wire(
            "rollout_slice",
            id,
            1,
            Some(&Spec::RolloutSlice {
                fleet_rollout_id: id.into(),
                phase: "canary".into(),
                hardware_id: "hw".into(),
                version: "2.0.0".into(),
                action: action.into(),
                plan,
            }),
        )
    }

    fn limit(kw: f64, generation: u64) -> pb::DesiredObject {
        object_to_wire(
            "site_limit",
            "site",
            generation,
            Some(&Spec::SiteLimit { limit_kw: kw }),
        )
    }

    #[test]
    fn round_trips_a_valid_revision() {
        let tariff = Spec::Tariff {
            prices_per_kwh: vec![0.2; TARIFF_SLOTS],
        };
        let msg = wire(
            3,
            false,
            vec![
                limit(120.0, 2),
                object_to_wire("tariff", "site", 1, Some(&tariff)),
                object_to_wire("site_limit", "old", 4, None),
                slice("f1", "halt", json!({"waves": [{"count": 2}]})),
            ],
        );
        let rev = DesiredRevision::from_wire(msg, 2).unwrap();
        assert!(matches!(
            &rev.objects[3].spec,
            Some(Spec::RolloutSlice { action, plan, .. }) if action == "halt" && plan["waves"][0]["count"] == 2
        ));
        assert_eq!(rev.revision, 3);
        assert_eq!(
            rev.objects[0].spec,
            Some(Spec::SiteLimit { limit_kw: 120.0 })
        );
        assert_eq!(rev.objects[1].spec, Some(tariff));
        assert_eq!(rev.objects[2].spec, None);
    }

    #[test]
    fn refuses_empty_unknown_invalid_and_older_states() {
        let cases = [
            (wire(5, true, vec![]), "empty full desired state"),
            (wire(0, false, vec![limit(1.0, 1)]), "revision 0"),
            (
                pb::DesiredState {
                    base_revision: 3,
                    ..wire(5, false, vec![limit(1.0, 1)])
                },
                "changes since revision 3 cannot apply",
            ),
            (
                wire(1, false, vec![limit(1.0, 1)]),
                "older than the stored revision 2",
            ),
            (
                wire(5, false, vec![limit(-3.0, 1)]),
                "site_limit.limit_kw: -3",
            ),
            (wire(5, false, vec![limit(f64::NAN, 1)]), "limit_kw: NaN"),
            (wire(5, false, vec![limit(1.0, 0)]), "generation 0"),
            (
                wire(
                    5,
                    false,
                    vec![pb::DesiredObject {
                        kind: "firmware".into(),
                        key: "x".into(),
                        generation: 1,
                        deleted: false,
                        spec: None,
                    }],
                ),
                "firmware/x: no content",
            ),
            (
                wire(
                    5,
                    false,
                    vec![pb::DesiredObject {
                        kind: "firmware".into(),
                        key: "x".into(),
                        generation: 1,
                        deleted: true,
                        spec: None,
                    }],
                ),
                "firmware/x: unknown kind",
            ),
            (
                wire(
                    5,
                    false,
                    vec![object_to_wire(
                        "tariff",
                        "site",
                        1,
                        Some(&Spec::Tariff {
                            prices_per_kwh: vec![0.1; 95],
                        }),
                    )],
                ),
                "95 prices given",
            ),
            (
                wire(
                    5,
                    false,
                    vec![pb::DesiredObject {
                        kind: "release".into(),
                        key: "x".into(),
                        generation: 1,
                        deleted: false,
                        spec: Some(pb::desired_object::Spec::Release(
                            pb::ReleaseToStage::default(),
                        )),
                    }],
                ),
                "release.hardware_id",
            ),
            (
                wire(
                    5,
                    false,
                    vec![object_to_wire(
                        "release",
                        "hw/2.0.0",
                        1,
                        Some(&Spec::Release {
                            hardware_id: "hw".into(),
                            version: "1.0.0".into(),
                            sha256: "a".repeat(64),
                        }),
                    )],
                ),
                "a release's key is hardware/version",
            ),
            (
                wire(5, false, vec![slice("f1", "launch", json!({}))]),
                "rollout_slice.action: \"launch\" is not one of",
            ),
            (
                wire(5, false, vec![slice("f1", "run", json!([1]))]),
                "rollout_slice.plan: not a JSON object",
            ),
            (
                wire(
                    5,
                    false,
                    vec![pb::DesiredObject {
                        key: "other".into(),
                        ..slice("f1", "run", json!({}))
                    }],
                ),
                "a rollout slice's key is its fleet rollout id",
            ),
            (
                wire(
                    5,
                    false,
                    vec![pb::DesiredObject {
                        spec: Some(pb::desired_object::Spec::RolloutSlice(pb::RolloutSlice {
                            fleet_rollout_id: "f1".into(),
                            phase: "canary".into(),
                            hardware_id: "hw".into(),
                            version: "2.0.0".into(),
                            action: "run".into(),
                            plan_json: "{not json".into(),
                        })),
                        ..slice("f1", "run", json!({}))
                    }],
                ),
                "rollout_slice.plan: key must be a string",
            ),
            (
                wire(
                    5,
                    false,
                    vec![pb::DesiredObject {
                        kind: "tariff".into(),
                        ..limit(5.0, 1)
                    }],
                ),
                "content is a site_limit",
            ),
        ];
        for (msg, want) in cases {
            let err = DesiredRevision::from_wire(msg, 2).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
