//! Register-map profiles: a charger or meter model described as data, so a new model is a TOML
//! file and no code.
//!
//! A profile names the registers for each role (status, plug, actual power, energy, the
//! current or power setpoint, enable), each with its function code, address, type, word order,
//! scale and unit, plus the model's keep-alive and failsafe behaviour. [`Profile::parse`]
//! checks everything a driver relies on before any device is contacted, and every error names
//! the field (`setpoint.fc: ...`), so a technician can fix a profile without reading code.
//!
//! Decoding and encoding ([`Register::decode`], [`Register::encode`]) are pure: words in,
//! values in canonical units (W, Wh, A, s) out, and back.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Highest address a register span may reach (Modbus addresses are 16 bits).
const ADDRESS_SPACE: u32 = 1 << 16;

/// The most registers one Modbus read returns (the protocol's limit for FC3/FC4).
const MAX_READ_WORDS: u16 = 125;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Not TOML, or a key misspelt or of the wrong type: the TOML error names the key and line.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> ProfileError {
    ProfileError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A charger or meter model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub device: Device,
    /// Where the registers start, for models that publish a map to discover (SunSpec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discover: Option<Discover>,
    /// IEC 61851 state (chargers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Register>,
    /// A vehicle is connected when this reads non-zero (after `mask`); without it, states B,
    /// C and D mean connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugged: Option<Register>,
    /// An error is active when this reads non-zero (after `mask`); states E and F always are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Register>,
    /// Actual active power (a power unit).
    pub power: Register,
    /// Session or total energy (an energy unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<Register>,
    /// The current or power limit the charger applies (chargers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setpoint: Option<Register>,
    /// Charging allowed (`on`) or not (`off`), for models with a separate switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<Register>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<KeepAlive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe: Option<Failsafe>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Charger,
    Meter,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub kind: Kind,
    pub manufacturer: String,
    pub model: String,
    /// Where the register facts come from (vendor manual, with the driver that used them).
    pub source: Vec<String>,
    /// Modbus unit id the device answers on by default (a site may override it).
    pub unit_id: u8,
    /// Phases the charger switches, for converting between current and power.
    #[serde(default = "three")]
    pub phases: u8,
    /// Phase voltage, V.
    #[serde(default = "volts")]
    pub voltage: f64,
    /// Least current the charger can deliver when on (IEC 61851: 6 A), A.
    #[serde(default = "six")]
    pub min_current_a: f64,
    /// Most current the charger delivers, A.
    #[serde(default = "thirty_two")]
    pub max_current_a: f64,
}

fn three() -> u8 {
    3
}
fn volts() -> f64 {
    230.0
}
fn six() -> f64 {
    6.0
}
fn thirty_two() -> f64 {
    32.0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Discover {
    /// SunSpec model ids to look for after the "SunS" marker; register addresses are then
    /// offsets from the first point of the model found.
    pub sunspec_models: Vec<u16>,
}

/// Where SunSpec devices put the "SunS" marker, in the order devices commonly use them.
pub const SUNSPEC_BASES: [u16; 3] = [40000, 50000, 0];

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    Ascii,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// The most significant word at the lowest address (Modbus' usual order).
    #[default]
    HighFirst,
    /// The least significant word first ("LSW", "word swapped").
    LowFirst,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Unit {
    W,
    #[serde(rename = "kW")]
    KW,
    #[serde(rename = "mW")]
    MW,
    Wh,
    #[serde(rename = "kWh")]
    KWh,
    A,
    #[serde(rename = "mA")]
    MA,
    #[serde(rename = "s")]
    S,
}

impl Unit {
    /// Multiply by this to get the canonical unit (W, Wh, A, s).
    fn factor(self) -> f64 {
        match self {
            Unit::W | Unit::Wh | Unit::A | Unit::S => 1.0,
            Unit::KW | Unit::KWh => 1000.0,
            Unit::MW | Unit::MA => 0.001,
        }
    }

    fn quantity(self) -> Quantity {
        match self {
            Unit::W | Unit::KW | Unit::MW => Quantity::Power,
            Unit::Wh | Unit::KWh => Quantity::Energy,
            Unit::A | Unit::MA => Quantity::Current,
            Unit::S => Quantity::Time,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Power,
    Energy,
    Current,
    Time,
}

/// One value on the device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Function code: 1 or 2 (bits), 3 or 4 (registers) to read; 5, 6 or 16 to write.
    pub fc: u8,
    pub address: u16,
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Registers an ASCII value spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u16>,
    #[serde(default)]
    pub word_order: WordOrder,
    /// Multiplies the raw value (after mask and shift).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub scale: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
    /// Bits of an integer to keep (after `shift`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<u64>,
    /// Right shift of an integer before `mask`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<u32>,
    /// Address (same function code and base) of a SunSpec scale factor: an i16 power of ten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_factor: Option<u16>,
    /// Status only: raw value (as text) to IEC 61851 state, for devices that number states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub states: Option<BTreeMap<String, String>>,
    /// Enable only: the values that switch charging on and off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off: Option<u16>,
}

fn one() -> f64 {
    1.0
}
fn is_one(v: &f64) -> bool {
    *v == 1.0
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeepAliveMode {
    /// Re-write the setpoint every `interval`, changed or not.
    Rewrite,
    /// Write `values` in turn to `register` every `interval` (a life bit or heartbeat).
    LifeBit,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeepAlive {
    pub mode: KeepAliveMode,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<Register>,
    /// Written in turn; `[1]` writes 1 every time (a device that clears it), `[0, 1]` toggles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<u16>>,
}

/// What the device does by itself when the depot stops talking to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Failsafe {
    /// Current the device falls back to, A.
    pub current_a: f64,
    /// Silence after which it falls back.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Where to write `current_a` on connecting, for devices where it is configurable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_register: Option<Register>,
    /// Where to write `timeout` on connecting (a time unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_register: Option<Register>,
}

/// IEC 61851-1 control pilot states.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum IecState {
    /// No vehicle.
    A,
    /// Vehicle connected, not charging.
    B,
    /// Charging.
    C,
    /// Charging, ventilation required.
    D,
    /// No power (short circuit or supply failure).
    E,
    /// Charger error.
    F,
}

impl IecState {
    /// Reads "A", "B1", "C2", ... (a trailing digit says whether PWM is on).
    pub fn parse(text: &str) -> Option<IecState> {
        let text = text.trim();
        let (letter, rest) = text.split_at_checked(1)?;
        if !(rest.is_empty() || rest == "1" || rest == "2") {
            return None;
        }
        Some(match letter {
            "A" => IecState::A,
            "B" => IecState::B,
            "C" => IecState::C,
            "D" => IecState::D,
            "E" => IecState::E,
            "F" => IecState::F,
            _ => return None,
        })
    }

    pub fn connected(self) -> bool {
        matches!(self, IecState::B | IecState::C | IecState::D)
    }

    pub fn charging(self) -> bool {
        matches!(self, IecState::C | IecState::D)
    }

    pub fn fault(self) -> bool {
        matches!(self, IecState::E | IecState::F)
    }
}

impl fmt::Display for IecState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A decoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// In the canonical unit (W, Wh, A, s), or unitless.
    Number(f64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {expected} registers, got {got}")]
    Length { expected: usize, got: usize },
    #[error("value {0} is not a finite number")]
    NotFinite(f64),
    #[error("status {0:?} is not an IEC 61851 state the profile knows")]
    UnknownState(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("{value} does not fit a {data_type:?} register")]
    OutOfRange { value: f64, data_type: DataType },
    #[error("a {0:?} register cannot be written as a number")]
    NotNumeric(DataType),
}

impl DataType {
    /// Registers (or bits) one value spans.
    fn words(self, length: Option<u16>) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::Ascii => length.unwrap_or(1),
        }
    }

    fn integer(self) -> bool {
        matches!(
            self,
            DataType::U16
                | DataType::I16
                | DataType::U32
                | DataType::I32
                | DataType::U64
                | DataType::I64
        )
    }
}

impl Register {
    /// Registers (or bits, for FC 1, 2 and 5) the value spans.
    pub fn words(&self) -> u16 {
        self.data_type.words(self.length)
    }

    /// Multiplier from the raw number to the canonical unit, given the SunSpec exponent.
    fn factor(&self, exponent: i16) -> f64 {
        self.scale * 10f64.powi(i32::from(exponent)) * self.unit.map_or(1.0, Unit::factor)
    }

    /// Decodes registers (for bits, 0 or 1 per word) read from the device.
    pub fn decode(&self, words: &[u16], exponent: i16) -> Result<Value, DecodeError> {
        let expected = usize::from(self.words());
        if words.len() != expected {
            return Err(DecodeError::Length {
                expected,
                got: words.len(),
            });
        }
        if self.data_type == DataType::Ascii {
            let mut bytes = Vec::with_capacity(words.len() * 2);
            for w in words {
                bytes.extend_from_slice(&w.to_be_bytes());
            }
            let text = String::from_utf8_lossy(&bytes);
            // Devices pad with NULs or spaces, before (a letter in the low byte) or after.
            let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
            return Ok(Value::Text(text.to_owned()));
        }
        let mut ordered = words.to_vec();
        if self.word_order == WordOrder::LowFirst {
            ordered.reverse();
        }
        let bits = ordered
            .iter()
            .fold(0u64, |acc, w| (acc << 16) | u64::from(*w));
        let raw = match self.data_type {
            DataType::Bool => (bits != 0) as u8 as f64,
            DataType::F32 => f64::from(f32::from_bits(bits as u32)),
            DataType::F64 => f64::from_bits(bits),
            t => {
                let shifted = bits >> self.shift.unwrap_or(0);
                let masked = self.mask.map_or(shifted, |m| shifted & m);
                // A mask or shift takes bits out of the value, so it reads as unsigned.
                let signed = self.mask.is_none() && self.shift.is_none();
                match t {
                    DataType::I16 if signed => f64::from(masked as u16 as i16),
                    DataType::I32 if signed => f64::from(masked as u32 as i32),
                    DataType::I64 if signed => masked as i64 as f64,
                    _ => masked as f64,
                }
            }
        };
        if !raw.is_finite() {
            return Err(DecodeError::NotFinite(raw));
        }
        Ok(Value::Number(raw * self.factor(exponent)))
    }

    /// The IEC 61851 state a status register reads.
    pub fn state(&self, value: &Value) -> Result<IecState, DecodeError> {
        let text = match value {
            Value::Text(t) => t.clone(),
            Value::Number(n) => format!("{n}"),
        };
        let mapped = match &self.states {
            Some(states) => states.get(&text).map(String::as_str),
            None => Some(text.as_str()),
        };
        mapped
            .and_then(IecState::parse)
            .ok_or(DecodeError::UnknownState(text))
    }

    /// Encodes a value in the canonical unit for writing.
    pub fn encode(&self, value: f64, exponent: i16) -> Result<Vec<u16>, EncodeError> {
        let raw = value / self.factor(exponent);
        let out_of_range = || EncodeError::OutOfRange {
            value,
            data_type: self.data_type,
        };
        if !raw.is_finite() {
            return Err(out_of_range());
        }
        let (bits, words): (u64, u16) = match self.data_type {
            DataType::Ascii => return Err(EncodeError::NotNumeric(self.data_type)),
            DataType::Bool => (u64::from(raw != 0.0), 1),
            DataType::F32 => (u64::from((raw as f32).to_bits()), 2),
            DataType::F64 => (raw.to_bits(), 4),
            t => {
                let r = raw.round();
                let (lo, hi) = match t {
                    DataType::U16 => (0.0, f64::from(u16::MAX)),
                    DataType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
                    DataType::U32 => (0.0, f64::from(u32::MAX)),
                    DataType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
                    DataType::U64 => (0.0, u64::MAX as f64),
                    _ => (i64::MIN as f64, i64::MAX as f64),
                };
                if r < lo || r > hi {
                    return Err(out_of_range());
                }
                let bits = if lo < 0.0 { r as i64 as u64 } else { r as u64 };
                (bits, t.words(None))
            }
        };
        let mut out: Vec<u16> = (0..words)
            .rev()
            .map(|i| (bits >> (16 * u32::from(i))) as u16)
            .collect();
        if self.word_order == WordOrder::LowFirst {
            out.reverse();
        }
        Ok(out)
    }

    fn check(&self, name: &str, role: Role) -> Result<(), ProfileError> {
        let f = |key: &str| format!("{name}.{key}");
        let reads = matches!(self.fc, 1..=4);
        let writes = matches!(self.fc, 5 | 6 | 16);
        match role {
            Role::Read if !reads => {
                return Err(field(
                    f("fc"),
                    format!("{} cannot be read; use 1, 2, 3 or 4", self.fc),
                ));
            }
            Role::Write if !writes => {
                return Err(field(
                    f("fc"),
                    format!("{} cannot be written; use 5, 6 or 16", self.fc),
                ));
            }
            _ => {}
        }
        let bits = matches!(self.fc, 1 | 2 | 5);
        if bits != (self.data_type == DataType::Bool) {
            return Err(field(
                f("type"),
                if bits {
                    format!(
                        "function code {} addresses bits: use type \"bool\"",
                        self.fc
                    )
                } else {
                    format!(
                        "type \"bool\" needs a bit function code (1, 2 or 5), not {}",
                        self.fc
                    )
                },
            ));
        }
        if self.fc == 6 && self.words() != 1 {
            return Err(field(
                f("fc"),
                "6 writes one register; a wider type needs 16",
            ));
        }
        match (self.data_type, self.length) {
            (DataType::Ascii, None) => {
                return Err(field(
                    f("length"),
                    "an ASCII value needs its length in registers",
                ));
            }
            (DataType::Ascii, Some(0)) => return Err(field(f("length"), "must be at least 1")),
            (DataType::Ascii, Some(n)) if n > MAX_READ_WORDS => {
                return Err(field(f("length"), format!("at most {MAX_READ_WORDS}")));
            }
            (DataType::Ascii, _) => {}
            (_, Some(_)) => return Err(field(f("length"), "only ASCII values have a length")),
            _ => {}
        }
        if u32::from(self.address) + u32::from(self.words()) > ADDRESS_SPACE {
            return Err(field(
                f("address"),
                format!(
                    "{} + {} registers runs past 65535",
                    self.address,
                    self.words()
                ),
            ));
        }
        if !(self.scale.is_finite() && self.scale != 0.0) {
            return Err(field(f("scale"), "must be a finite, non-zero number"));
        }
        if (self.mask.is_some() || self.shift.is_some()) && !self.data_type.integer() {
            return Err(field(
                f(if self.mask.is_some() { "mask" } else { "shift" }),
                "only integer types can be masked or shifted",
            ));
        }
        if self.shift.is_some_and(|s| s >= 64) {
            return Err(field(f("shift"), "must be below 64"));
        }
        if self.states.is_some() && role != Role::Status {
            return Err(field(f("states"), "only the status register maps states"));
        }
        if let Some(states) = &self.states {
            for (raw, state) in states {
                if IecState::parse(state).is_none() {
                    return Err(field(
                        format!("{name}.states.{raw}"),
                        format!("{state:?} is not an IEC 61851 state (A to F, optionally 1 or 2)"),
                    ));
                }
            }
        }
        if (self.on.is_some() || self.off.is_some()) && role != Role::Enable {
            return Err(field(
                f(if self.on.is_some() { "on" } else { "off" }),
                "only the enable register has on and off values",
            ));
        }
        Ok(())
    }

    fn expect_unit(&self, name: &str, quantities: &[Quantity]) -> Result<(), ProfileError> {
        let wanted = quantities
            .iter()
            .map(|q| match q {
                Quantity::Power => "W, kW or mW",
                Quantity::Energy => "Wh or kWh",
                Quantity::Current => "A or mA",
                Quantity::Time => "s",
            })
            .collect::<Vec<_>>()
            .join(", or ");
        match self.unit {
            Some(u) if quantities.contains(&u.quantity()) => Ok(()),
            Some(u) => Err(field(
                format!("{name}.unit"),
                format!("{u:?} is not a unit of this value; use {wanted}"),
            )),
            None => Err(field(
                format!("{name}.unit"),
                format!("missing; use {wanted}"),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Read,
    Status,
    Write,
    Enable,
}

impl Profile {
    /// Parses and checks a profile; errors name the field.
    pub fn parse(text: &str) -> Result<Profile, ProfileError> {
        let profile: Profile = toml::from_str(text)?;
        profile.check()?;
        Ok(profile)
    }

    /// Setpoint quantity: current (A) or power (W).
    pub fn setpoint_quantity(&self) -> Option<Quantity> {
        self.setpoint
            .as_ref()
            .and_then(|s| s.unit)
            .map(Unit::quantity)
    }

    /// Power for a current on this charger, W.
    pub fn watts(&self, amps: f64) -> f64 {
        amps * self.device.voltage * f64::from(self.device.phases)
    }

    /// Current for a power on this charger, A.
    pub fn amps(&self, watts: f64) -> f64 {
        watts / (self.device.voltage * f64::from(self.device.phases))
    }

    fn check(&self) -> Result<(), ProfileError> {
        let d = &self.device;
        if d.manufacturer.trim().is_empty() || d.model.trim().is_empty() {
            return Err(field(
                "device.model",
                "manufacturer and model must not be empty",
            ));
        }
        if d.source.iter().all(|s| s.trim().is_empty()) {
            return Err(field(
                "device.source",
                "say where the register facts come from (vendor manual, driver)",
            ));
        }
        if !(1..=3).contains(&d.phases) {
            return Err(field("device.phases", "must be 1, 2 or 3"));
        }
        if !(d.voltage > 0.0 && d.voltage < 1000.0) {
            return Err(field("device.voltage", "must be between 0 and 1000 V"));
        }
        if !(d.min_current_a >= 0.0
            && d.min_current_a <= d.max_current_a
            && d.max_current_a <= 1000.0)
        {
            return Err(field(
                "device.min_current_a",
                "needs 0 <= min_current_a <= max_current_a <= 1000",
            ));
        }
        if let Some(discover) = &self.discover
            && discover.sunspec_models.is_empty()
        {
            return Err(field(
                "discover.sunspec_models",
                "name at least one model id",
            ));
        }
        self.power.check("power", Role::Read)?;
        self.power.expect_unit("power", &[Quantity::Power])?;
        if let Some(energy) = &self.energy {
            energy.check("energy", Role::Read)?;
            energy.expect_unit("energy", &[Quantity::Energy])?;
        }
        if let Some(r) = &self.plugged {
            r.check("plugged", Role::Read)?;
        }
        if let Some(r) = &self.fault {
            r.check("fault", Role::Read)?;
        }
        match d.kind {
            Kind::Meter => {
                for (name, present) in [
                    ("status", self.status.is_some()),
                    ("setpoint", self.setpoint.is_some()),
                    ("enable", self.enable.is_some()),
                    ("keep_alive", self.keep_alive.is_some()),
                    ("failsafe", self.failsafe.is_some()),
                ] {
                    if present {
                        return Err(field(name, "a meter has no such register; remove it"));
                    }
                }
            }
            Kind::Charger => {
                let status = self
                    .status
                    .as_ref()
                    .ok_or_else(|| field("status", "missing: a charger needs its state"))?;
                status.check("status", Role::Status)?;
                if !matches!(status.fc, 3 | 4) {
                    return Err(field("status.fc", "read the state with 3 or 4"));
                }
                let setpoint = self.setpoint.as_ref().ok_or_else(|| {
                    field(
                        "setpoint",
                        "missing: a charger needs a current or power setpoint",
                    )
                })?;
                setpoint.check("setpoint", Role::Write)?;
                setpoint.expect_unit("setpoint", &[Quantity::Current, Quantity::Power])?;
                if let Some(enable) = &self.enable {
                    enable.check("enable", Role::Enable)?;
                    if !matches!(enable.fc, 5 | 6 | 16) {
                        return Err(field("enable.fc", "write the switch with 5, 6 or 16"));
                    }
                }
                self.check_keep_alive()?;
                self.check_failsafe()?;
            }
        }
        Ok(())
    }

    fn check_keep_alive(&self) -> Result<(), ProfileError> {
        let Some(k) = &self.keep_alive else {
            return Ok(());
        };
        if k.interval < Duration::from_secs(1) {
            return Err(field("keep_alive.interval", "must be at least 1s"));
        }
        if let Some(f) = &self.failsafe
            && k.interval >= f.timeout
        {
            return Err(field(
                "keep_alive.interval",
                format!(
                    "{} does not come before the failsafe timeout {}",
                    humantime::format_duration(k.interval),
                    humantime::format_duration(f.timeout)
                ),
            ));
        }
        match (k.mode, &k.register) {
            (KeepAliveMode::LifeBit, None) => Err(field(
                "keep_alive.register",
                "a life bit needs the register it is written to",
            )),
            (KeepAliveMode::LifeBit, Some(r)) => {
                r.check("keep_alive.register", Role::Write)?;
                if k.values.as_ref().is_some_and(Vec::is_empty) {
                    return Err(field("keep_alive.values", "name at least one value"));
                }
                Ok(())
            }
            (KeepAliveMode::Rewrite, Some(_)) => Err(field(
                "keep_alive.register",
                "rewrite re-writes the setpoint; remove the register or use mode = \"life_bit\"",
            )),
            (KeepAliveMode::Rewrite, None) if k.values.is_some() => {
                Err(field("keep_alive.values", "only a life bit has values"))
            }
            (KeepAliveMode::Rewrite, None) => Ok(()),
        }
    }

    fn check_failsafe(&self) -> Result<(), ProfileError> {
        let Some(f) = &self.failsafe else {
            return Ok(());
        };
        if !(f.current_a >= 0.0 && f.current_a <= self.device.max_current_a) {
            return Err(field(
                "failsafe.current_a",
                "must be between 0 and device.max_current_a",
            ));
        }
        if f.timeout < Duration::from_secs(1) {
            return Err(field("failsafe.timeout", "must be at least 1s"));
        }
        if let Some(r) = &f.current_register {
            r.check("failsafe.current_register", Role::Write)?;
            r.expect_unit("failsafe.current_register", &[Quantity::Current])?;
        }
        if let Some(r) = &f.timeout_register {
            r.check("failsafe.timeout_register", Role::Write)?;
            r.expect_unit("failsafe.timeout_register", &[Quantity::Time])?;
        }
        Ok(())
    }
}

/// The profiles that ship with atlasmesh, by file stem.
pub const BUILTIN: [(&str, &str); 8] = [
    ("alfen-ng9xx", include_str!("../profiles/alfen-ng9xx.toml")),
    (
        "abb-terra-ac",
        include_str!("../profiles/abb-terra-ac.toml"),
    ),
    (
        "phoenix-em-cp-pp-eth",
        include_str!("../profiles/phoenix-em-cp-pp-eth.toml"),
    ),
    ("keba-p30", include_str!("../profiles/keba-p30.toml")),
    (
        "schneider-evlink-pro",
        include_str!("../profiles/schneider-evlink-pro.toml"),
    ),
    (
        "eastron-sdm630",
        include_str!("../profiles/eastron-sdm630.toml"),
    ),
    (
        "sunspec-meter",
        include_str!("../profiles/sunspec-meter.toml"),
    ),
    (
        "sunspec-float-meter",
        include_str!("../profiles/sunspec-float-meter.toml"),
    ),
];

/// A shipped profile by name.
pub fn builtin(name: &str) -> Option<Result<Profile, ProfileError>> {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| Profile::parse(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(data_type: DataType, word_order: WordOrder) -> Register {
        Register {
            fc: 3,
            address: 0,
            data_type,
            length: None,
            word_order,
            scale: 1.0,
            unit: None,
            mask: None,
            shift: None,
            scale_factor: None,
            states: None,
            on: None,
            off: None,
        }
    }

    #[test]
    fn every_shipped_profile_parses() {
        for (name, text) in BUILTIN {
            Profile::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn numbers_round_trip_in_both_word_orders() {
        for order in [WordOrder::HighFirst, WordOrder::LowFirst] {
            for (t, v) in [
                (DataType::U16, 65535.0),
                (DataType::I16, -12.0),
                (DataType::U32, 4_000_000_000.0),
                (DataType::I32, -2_000_000.0),
                (DataType::U64, 9.0e15),
                (DataType::I64, -9.0e15),
                (DataType::F32, 11040.5),
                (DataType::F64, 123456.789),
            ] {
                let r = reg(t, order);
                let words = r.encode(v, 0).unwrap();
                assert_eq!(
                    r.decode(&words, 0).unwrap(),
                    Value::Number(v),
                    "{t:?} {order:?}"
                );
            }
        }
    }

    #[test]
    fn word_order_is_applied() {
        let mut r = reg(DataType::U32, WordOrder::HighFirst);
        assert_eq!(r.encode(0x0001_0002 as f64, 0).unwrap(), vec![1, 2]);
        r.word_order = WordOrder::LowFirst;
        assert_eq!(r.encode(0x0001_0002 as f64, 0).unwrap(), vec![2, 1]);
        assert_eq!(
            r.decode(&[2, 1], 0).unwrap(),
            Value::Number(0x0001_0002 as f64)
        );
    }

    #[test]
    fn scale_unit_mask_and_sunspec_exponent_apply() {
        let mut r = reg(DataType::I32, WordOrder::LowFirst);
        r.scale = 0.01;
        r.unit = Some(Unit::KW);
        // 1104 x 0.01 kW = 11.04 kW = 11040 W
        let v = r.decode(&[1104, 0], 0).unwrap();
        assert!(
            matches!(v, Value::Number(w) if (w - 11040.0).abs() < 1e-6),
            "{v:?}"
        );
        let mut s = reg(DataType::U16, WordOrder::HighFirst);
        s.shift = Some(8);
        s.mask = Some(0x7f);
        assert_eq!(s.decode(&[0x8304], 0).unwrap(), Value::Number(3.0));
        let mut w = reg(DataType::I16, WordOrder::HighFirst);
        w.unit = Some(Unit::W);
        assert_eq!(w.decode(&[1234], 1).unwrap(), Value::Number(12340.0));
        assert_eq!(w.encode(12340.0, 1).unwrap(), vec![1234]);
    }

    #[test]
    fn ascii_states_and_mapped_states_decode() {
        let mut r = reg(DataType::Ascii, WordOrder::HighFirst);
        r.length = Some(5);
        let words = [u16::from_be_bytes(*b"C2"), 0, 0, 0, 0];
        let v = r.decode(&words, 0).unwrap();
        assert_eq!(v, Value::Text("C2".into()));
        assert_eq!(r.state(&v).unwrap(), IecState::C);
        assert!(r.state(&Value::Text("X9".into())).is_err());
        let mut n = reg(DataType::U16, WordOrder::HighFirst);
        n.states = Some(BTreeMap::from([
            ("3".into(), "C".into()),
            ("1".into(), "B".into()),
        ]));
        assert_eq!(n.state(&Value::Number(3.0)).unwrap(), IecState::C);
        assert_eq!(
            n.state(&Value::Number(7.0)),
            Err(DecodeError::UnknownState("7".into()))
        );
    }

    #[test]
    fn wrong_lengths_and_out_of_range_values_are_errors() {
        let r = reg(DataType::F32, WordOrder::HighFirst);
        assert_eq!(
            r.decode(&[1], 0),
            Err(DecodeError::Length {
                expected: 2,
                got: 1
            })
        );
        assert!(r.decode(&[0x7fc0, 0], 0).is_err(), "NaN is refused");
        let u = reg(DataType::U16, WordOrder::HighFirst);
        assert!(u.encode(70000.0, 0).is_err());
        assert!(u.encode(-1.0, 0).is_err());
    }

    fn alfen() -> String {
        BUILTIN[0].1.to_owned()
    }

    fn parse_err(text: &str) -> String {
        Profile::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn malformed_profiles_name_the_field() {
        let cases = [
            (alfen().replace("fc = 16", "fc = 3"), "setpoint.fc"),
            (
                alfen().replacen("type = \"f32\"", "type = \"f31\"", 1),
                "unknown variant `f31`",
            ),
            (
                alfen().replace("address = 344", "adress = 344"),
                "unknown field `adress`",
            ),
            (
                alfen().replace("unit = \"W\"", "unit = \"Wh\""),
                "power.unit",
            ),
            (alfen().replace("length = 5", "length = 0"), "status.length"),
            (
                alfen().replace("source = [", "source = [\"\"]\nold_source = ["),
                "unknown field `old_source`",
            ),
            (
                alfen().replace("kind = \"charger\"", "kind = \"meter\""),
                "status",
            ),
            (
                alfen().replace("interval = \"20s\"", "interval = \"60s\""),
                "keep_alive.interval",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_err(&text);
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
        assert!(parse_err("[device]\nkind = \"charger\"").contains("missing field"));
    }
}
