//! The MQTT wire format between vehicles and their depot, version 1: topic names and JSON
//! payloads, parsed and checked without I/O. docs/vehicle-link.md is the human description;
//! this module is the definition, and its tests pin the examples given there.
//!
//! Topics, under `atlasmesh/v1/depots/{depot}/vehicles/{vehicle}/`:
//!
//! - upward (vehicle to depot): `dock`, `state`, `ota`, `health`, and `link` (retained; also the
//!   vehicle's Last Will, so the depot learns of a lost link from the broker);
//! - downward (depot to vehicle): `cmd/ota`, `cmd/charge`.
//!
//! Within v1 changes are additive: unknown fields are ignored, so an older depot still reads a
//! newer vehicle. Anything that changes a field's meaning gets a new version in the topic.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The version segment of every topic.
pub const VERSION: &str = "v1";
/// Largest payload accepted; every v1 message is far smaller.
pub const MAX_PAYLOAD: usize = 16 * 1024;

/// What a vehicle publishes about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upward {
    Dock,
    State,
    Ota,
    Health,
    Link,
}

impl Upward {
    pub const ALL: [Upward; 5] = [
        Upward::Dock,
        Upward::State,
        Upward::Ota,
        Upward::Health,
        Upward::Link,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Upward::Dock => "dock",
            Upward::State => "state",
            Upward::Ota => "ota",
            Upward::Health => "health",
            Upward::Link => "link",
        }
    }
}

/// What the depot tells a vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Downward {
    Ota,
    Charge,
}

impl Downward {
    pub fn as_str(self) -> &'static str {
        match self {
            Downward::Ota => "cmd/ota",
            Downward::Charge => "cmd/charge",
        }
    }
}

/// Topic names for one depot.
#[derive(Debug, Clone)]
pub struct Topics {
    depot: String,
}

impl Topics {
    pub fn new(depot: &str) -> Result<Self, WireError> {
        check_id("depot id", depot)?;
        Ok(Self {
            depot: depot.to_owned(),
        })
    }

    fn vehicles(&self) -> String {
        format!("atlasmesh/{VERSION}/depots/{}/vehicles", self.depot)
    }

    pub fn upward(&self, vehicle: &str, kind: Upward) -> String {
        format!("{}/{vehicle}/{}", self.vehicles(), kind.as_str())
    }

    pub fn downward(&self, vehicle: &str, kind: Downward) -> String {
        format!("{}/{vehicle}/{}", self.vehicles(), kind.as_str())
    }

    /// The depot's subscription: every vehicle's upward topics.
    pub fn upward_filter(&self) -> String {
        format!("{}/+/+", self.vehicles())
    }

    /// A vehicle's subscription: its own commands.
    pub fn downward_filter(&self, vehicle: &str) -> String {
        format!("{}/{vehicle}/cmd/+", self.vehicles())
    }

    /// The vehicle and message kind of an upward topic of this depot.
    pub fn parse_upward(&self, topic: &str) -> Result<(String, Upward), WireError> {
        let bad = || WireError::Topic(topic.to_owned());
        let rest = topic
            .strip_prefix(&self.vehicles())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(bad)?;
        let (vehicle, kind) = rest.split_once('/').ok_or_else(bad)?;
        check_id("vehicle id", vehicle)?;
        let kind = Upward::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(bad)?;
        Ok((vehicle.to_owned(), kind))
    }

    /// The broker-side rule for a vehicle's publications (its Last Will included): only its own
    /// upward topics, so no vehicle can speak for another.
    pub fn may_publish(&self, vehicle: &str, topic: &str) -> bool {
        self.parse_upward(topic).is_ok_and(|(v, _)| v == vehicle)
    }

    /// The broker-side rule for a vehicle's subscriptions: its own commands, no wildcard that
    /// reaches further.
    pub fn may_subscribe(&self, vehicle: &str, filter: &str) -> bool {
        filter == self.downward_filter(vehicle)
            || [Downward::Ota, Downward::Charge]
                .into_iter()
                .any(|k| filter == self.downward(vehicle, k))
    }
}

/// Ids that appear in topics follow the depot's one id rule (`director::is_plain_id`), so they
/// are never an MQTT wildcard or level separator.
pub fn check_id(what: &'static str, id: &str) -> Result<(), WireError> {
    if atlasmesh_ota_staging::director::is_plain_id(id) {
        Ok(())
    } else {
        Err(WireError::Invalid(format!(
            "{what} {id:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Why a message was refused. Each is counted and logged by the receiver, never fatal.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("not a v1 vehicle topic of this depot: {0}")]
    Topic(String),
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("payload is not the expected JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Invalid(String),
}

impl WireError {
    /// Label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Topic(_) => "topic",
            WireError::TooLarge(_) => "too_large",
            WireError::Json(_) => "malformed",
            WireError::Invalid(_) => "invalid",
        }
    }
}

/// A vehicle arriving at or leaving a bay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dock {
    pub docked: bool,
    /// The bay, when docked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bay: Option<String>,
    /// Vehicle clock, Unix milliseconds.
    pub ts_ms: i64,
}

/// Which of the two system slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "a",
            Slot::B => "b",
        })
    }
}

/// Charge and software state, sent on docking, on change, and at least every minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// State of charge, percent.
    pub soc_percent: f64,
    /// Usable battery capacity, kWh.
    pub battery_kwh: f64,
    pub plugged_in: bool,
    /// When the vehicle must leave, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure_ms: Option<i64>,
    pub installed_version: String,
    pub slot: Slot,
    /// Free space for an update on the inactive slot's filesystem.
    pub free_bytes: u64,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtaPhase {
    Download,
    Install,
    Boot,
    Health,
    /// Returning to the previous version on the other slot, as the depot commanded.
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtaOutcome {
    Started,
    Progress,
    Succeeded,
    Failed,
}

/// Progress and results of installing an assigned version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtaReport {
    pub version: String,
    pub phase: OtaPhase,
    pub outcome: OtaOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Why, when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    Degraded,
    Failed,
}

/// The vehicle's own health verdict, with the checks that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<String>,
    pub ts_ms: i64,
}

/// Retained link state; the Last Will carries `online: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub online: bool,
}

/// A checked upward message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Dock(Dock),
    State(State),
    Ota(OtaReport),
    Health(Health),
    Link(Link),
}

/// Parses and checks the payload of an upward message of `kind`.
pub fn parse_upward(kind: Upward, payload: &[u8]) -> Result<Message, WireError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::TooLarge(payload.len()));
    }
    fn json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, WireError> {
        serde_json::from_slice(payload).map_err(|e| WireError::Json(e.to_string()))
    }
    let message = match kind {
        Upward::Dock => Message::Dock(json(payload)?),
        Upward::State => Message::State(json(payload)?),
        Upward::Ota => Message::Ota(json(payload)?),
        Upward::Health => Message::Health(json(payload)?),
        Upward::Link => Message::Link(json(payload)?),
    };
    check(&message)?;
    Ok(message)
}

fn invalid(message: String) -> Result<(), WireError> {
    Err(WireError::Invalid(message))
}

fn check_text(what: &str, text: &str) -> Result<(), WireError> {
    if text.is_empty() || text.len() > 128 || text.chars().any(char::is_control) {
        return invalid(format!("{what} must be 1 to 128 printable characters"));
    }
    Ok(())
}

fn check(message: &Message) -> Result<(), WireError> {
    match message {
        Message::Dock(d) => match (&d.docked, &d.bay) {
            (true, Some(bay)) => check_id("bay", bay),
            (true, None) => invalid("a dock event with docked: true names its bay".into()),
            (false, _) => Ok(()),
        },
        Message::State(s) => {
            if !(0.0..=100.0).contains(&s.soc_percent) {
                return invalid(format!("soc_percent {} is outside 0..=100", s.soc_percent));
            }
            if !(s.battery_kwh > 0.0 && s.battery_kwh <= 2000.0) {
                return invalid(format!("battery_kwh {} is outside 0..=2000", s.battery_kwh));
            }
            check_text("installed_version", &s.installed_version)
        }
        Message::Ota(o) => {
            check_text("version", &o.version)?;
            if let (Some(done), Some(total)) = (o.bytes_done, o.bytes_total)
                && done > total
            {
                return invalid(format!("bytes_done {done} exceeds bytes_total {total}"));
            }
            if o.outcome == OtaOutcome::Failed && o.error.is_none() {
                return invalid("a failed OTA report says why in `error`".into());
            }
            Ok(())
        }
        Message::Health(h) => {
            if h.faults.len() > 64 {
                return invalid("at most 64 faults".into());
            }
            h.faults.iter().try_for_each(|f| check_text("fault", f))
        }
        Message::Link(_) => Ok(()),
    }
}

/// Tells a vehicle that the depot has an assignment for it (pull it from `depot_url`), or,
/// with `action: rollback`, to leave `version` for the version on its other slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtaCommand {
    /// Absent in version 1.0 commands, which only ever meant install.
    #[serde(default)]
    pub action: OtaAction,
    pub version: String,
    /// With `rollback`: the version the vehicle should be back on (N-1), when the depot knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<String>,
    pub hardware_id: String,
    /// The depot's vehicle-facing base URL (TUF repositories, chunks).
    pub depot_url: String,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtaAction {
    #[default]
    Install,
    Rollback,
}

/// Charging instruction for a plugged-in vehicle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChargeCommand {
    /// Stop charging at this state of charge, percent.
    pub target_soc_percent: f64,
    /// Current limit the charger will apply, amperes; 0 pauses charging.
    pub max_current_a: f64,
    pub ts_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("depot-7").unwrap()
    }

    #[test]
    fn topics_name_the_depot_the_vehicle_and_the_kind() {
        let t = topics();
        let topic = t.upward("veh-042", Upward::State);
        assert_eq!(topic, "atlasmesh/v1/depots/depot-7/vehicles/veh-042/state");
        assert_eq!(
            t.parse_upward(&topic).unwrap(),
            ("veh-042".to_owned(), Upward::State)
        );
        assert_eq!(
            t.downward("veh-042", Downward::Ota),
            "atlasmesh/v1/depots/depot-7/vehicles/veh-042/cmd/ota"
        );
        assert_eq!(
            t.upward_filter(),
            "atlasmesh/v1/depots/depot-7/vehicles/+/+"
        );
        for bad in [
            "atlasmesh/v1/depots/depot-8/vehicles/veh-042/state",
            "atlasmesh/v1/depots/depot-7/vehicles/veh-042/cmd",
            "atlasmesh/v1/depots/depot-7/vehicles/veh-042/telemetry",
            "atlasmesh/v1/depots/depot-7/vehicles/veh-042",
            "atlasmesh/v2/depots/depot-7/vehicles/veh-042/state",
        ] {
            assert!(t.parse_upward(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            t.parse_upward("atlasmesh/v1/depots/depot-7/vehicles/.hidden/state"),
            Err(WireError::Invalid(_))
        ));
        assert!(Topics::new("depot/+").is_err());
    }

    /// The examples in docs/vehicle-link.md, parsed as the depot parses them.
    #[test]
    fn a_vehicle_may_publish_and_subscribe_only_its_own_topics() {
        let t = topics();
        assert!(t.may_publish("veh-7", &t.upward("veh-7", Upward::State)));
        assert!(t.may_publish("veh-7", &t.upward("veh-7", Upward::Link)));
        assert!(!t.may_publish("veh-7", &t.upward("veh-8", Upward::State)));
        assert!(!t.may_publish("veh-7", &t.downward("veh-7", Downward::Ota)));
        assert!(!t.may_publish("veh-7", "atlasmesh/v1/depots/other/vehicles/veh-7/state"));
        assert!(!t.may_publish("veh-7", &t.upward_filter()));
        assert!(t.may_subscribe("veh-7", &t.downward_filter("veh-7")));
        assert!(t.may_subscribe("veh-7", &t.downward("veh-7", Downward::Ota)));
        assert!(!t.may_subscribe("veh-7", &t.downward_filter("veh-8")));
        assert!(!t.may_subscribe("veh-7", &t.upward_filter()));
        assert!(!t.may_subscribe("veh-7", "#"));
        assert!(!t.may_subscribe("veh-7", "atlasmesh/v1/depots/depot-1/vehicles/veh-7/#"));
    }

    #[test]
    fn documented_examples_parse() {
        let examples = [
            (
                Upward::Dock,
                r#"{"docked": true, "bay": "bay-03", "ts_ms": 1795000000000}"#,
            ),
            (
                Upward::State,
                r#"{"soc_percent": 41.5, "battery_kwh": 82.0, "plugged_in": true, "departure_ms": 1795020000000, "installed_version": "1.4.0", "slot": "a", "free_bytes": 8000000000, "ts_ms": 1795000001000}"#,
            ),
            (
                Upward::Ota,
                r#"{"version": "1.5.0", "phase": "download", "outcome": "progress", "bytes_done": 1048576, "bytes_total": 4194304, "ts_ms": 1795000002000}"#,
            ),
            (
                Upward::Ota,
                r#"{"version": "1.5.0", "phase": "boot", "outcome": "failed", "error": "watchdog reset during boot", "ts_ms": 1795000003000}"#,
            ),
            (
                Upward::Health,
                r#"{"status": "degraded", "faults": ["lidar-front: calibration drift"], "ts_ms": 1795000004000}"#,
            ),
            (Upward::Link, r#"{"online": false}"#),
        ];
        for (kind, payload) in examples {
            parse_upward(kind, payload.as_bytes()).unwrap_or_else(|e| panic!("{payload}: {e}"));
        }
        let ota: OtaCommand = serde_json::from_str(
            r#"{"version": "1.5.0", "hardware_id": "veh-gen2", "depot_url": "http://10.0.0.2:8080/", "ts_ms": 1795000005000}"#,
        )
        .unwrap();
        assert_eq!(ota.hardware_id, "veh-gen2");
        assert_eq!(ota.action, OtaAction::Install, "1.0 commands meant install");
        let rollback: OtaCommand = serde_json::from_str(
            r#"{"action": "rollback", "version": "1.5.0", "to_version": "1.4.2", "hardware_id": "veh-gen2", "depot_url": "http://10.0.0.2:8080/", "ts_ms": 1795000007000}"#,
        )
        .unwrap();
        assert_eq!(rollback.action, OtaAction::Rollback);
        parse_upward(
            Upward::Ota,
            br#"{"version": "1.5.0", "phase": "rollback", "outcome": "succeeded", "ts_ms": 1795000008000}"#,
        )
        .unwrap();
        let charge: ChargeCommand = serde_json::from_str(
            r#"{"target_soc_percent": 80.0, "max_current_a": 32.0, "ts_ms": 1795000006000}"#,
        )
        .unwrap();
        assert_eq!(charge.max_current_a, 32.0);
        // Additive changes within v1: unknown fields are ignored.
        parse_upward(Upward::Link, br#"{"online": true, "since_ms": 5}"#).unwrap();
    }

    #[test]
    fn bad_payloads_are_refused_with_a_reason() {
        let cases: [(Upward, &[u8], &str); 9] = [
            (Upward::State, b"not json", "malformed"),
            (Upward::State, br#"{"soc_percent": 50}"#, "malformed"),
            (Upward::Dock, br#"{"docked": true, "ts_ms": 1}"#, "invalid"),
            (Upward::Dock, br#"{"docked": true, "bay": "a/b", "ts_ms": 1}"#, "invalid"),
            (
                Upward::State,
                br#"{"soc_percent": 140, "battery_kwh": 82, "plugged_in": true, "installed_version": "1", "slot": "a", "free_bytes": 1, "ts_ms": 1}"#,
                "invalid",
            ),
            (
                Upward::State,
                br#"{"soc_percent": 40, "battery_kwh": 82, "plugged_in": true, "installed_version": "1", "slot": "c", "free_bytes": 1, "ts_ms": 1}"#,
                "malformed",
            ),
            (
                Upward::Ota,
                br#"{"version": "1", "phase": "install", "outcome": "failed", "ts_ms": 1}"#,
                "invalid",
            ),
            (
                Upward::Ota,
                br#"{"version": "1", "phase": "download", "outcome": "progress", "bytes_done": 5, "bytes_total": 4, "ts_ms": 1}"#,
                "invalid",
            ),
            (Upward::Health, br#"{"status": "fine", "ts_ms": 1}"#, "malformed"),
        ];
        for (kind, payload, reason) in cases {
            let error = parse_upward(kind, payload).unwrap_err();
            assert_eq!(
                error.reason(),
                reason,
                "{}: {error}",
                String::from_utf8_lossy(payload)
            );
        }
        let huge = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(
            parse_upward(Upward::Link, &huge).unwrap_err(),
            WireError::TooLarge(MAX_PAYLOAD + 1)
        );
    }
}
