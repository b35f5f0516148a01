//! A Modbus TCP driver for any [`Profile`]: reads state, power and energy, writes setpoints,
//! keep-alives and failsafe settings. One connection per device; every request has a timeout.
//!
//! A device that fails (timeout, exception, malformed reply, dropped connection) is not
//! retried here: the caller drops the [`Device`] and reconnects later, so a late reply to a
//! timed-out request can never be taken for the answer to the next one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_modbus::client::{Client, Context, Writer, tcp};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use crate::profile::{
    DecodeError, EncodeError, IecState, KeepAliveMode, Profile, Quantity, Register, SUNSPEC_BASES,
    Value,
};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{what}: no reply within {}", humantime::format_duration(*.timeout))]
    Timeout { what: String, timeout: Duration },
    #[error("{what}: the device answered with exception {code}")]
    Exception { what: String, code: ExceptionCode },
    #[error("{what}: {reason}")]
    Transport { what: String, reason: String },
    #[error("{what}: {source}")]
    Decode { what: String, source: DecodeError },
    #[error("{what}: {source}")]
    Encode { what: String, source: EncodeError },
    #[error("no SunSpec model {models:?} found (looked for \"SunS\" at {SUNSPEC_BASES:?})")]
    Discover { models: Vec<u16> },
    #[error("the profile is a meter's; it has no setpoint")]
    NotACharger,
}

impl DriverError {
    /// A short code for the API and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            DriverError::Connect { .. } => "unreachable",
            DriverError::Timeout { .. } => "timeout",
            DriverError::Exception { .. } => "exception",
            DriverError::Transport { .. } => "transport",
            DriverError::Decode { .. } | DriverError::Discover { .. } => "malformed",
            DriverError::Encode { .. } | DriverError::NotACharger => "profile",
        }
    }
}

/// What one poll of a device read.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reading {
    /// IEC 61851 state (chargers).
    pub state: Option<IecState>,
    /// The status as the device gave it ("C2", "3").
    pub status: Option<String>,
    pub plugged: bool,
    pub charging: bool,
    pub fault: bool,
    /// Actual active power, W.
    pub power_w: f64,
    /// Session or total energy, Wh.
    pub energy_wh: Option<f64>,
}

/// A connected device.
pub struct Device {
    profile: Arc<Profile>,
    ctx: Context,
    /// Added to every address (SunSpec: the first point of the model found).
    base: u16,
    timeout: Duration,
    /// Next life-bit value to write.
    life: usize,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("model", &self.profile.device.model)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Connects and, for SunSpec profiles, finds the model's registers.
    pub async fn connect(
        addr: SocketAddr,
        unit_id: u8,
        profile: Arc<Profile>,
        timeout: Duration,
    ) -> Result<Device, DriverError> {
        let ctx =
            match tokio::time::timeout(timeout, tcp::connect_slave(addr, Slave(unit_id))).await {
                Ok(Ok(ctx)) => ctx,
                Ok(Err(e)) => {
                    return Err(DriverError::Connect {
                        addr,
                        reason: e.to_string(),
                    });
                }
                Err(_) => {
                    return Err(DriverError::Connect {
                        addr,
                        reason: format!("no answer within {}", humantime::format_duration(timeout)),
                    });
                }
            };
        let mut device = Device {
            profile,
            ctx,
            base: 0,
            timeout,
            life: 0,
        };
        if let Some(discover) = device.profile.discover.clone() {
            device.base = device.sunspec(&discover.sunspec_models).await?;
        }
        Ok(device)
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    async fn request<T>(
        &mut self,
        what: &str,
        call: impl AsyncFnOnce(&mut Context) -> tokio_modbus::Result<T>,
    ) -> Result<T, DriverError> {
        match tokio::time::timeout(self.timeout, call(&mut self.ctx)).await {
            Err(_) => Err(DriverError::Timeout {
                what: what.to_owned(),
                timeout: self.timeout,
            }),
            Ok(Err(e)) => Err(DriverError::Transport {
                what: what.to_owned(),
                reason: e.to_string(),
            }),
            Ok(Ok(Err(code))) => Err(DriverError::Exception {
                what: what.to_owned(),
                code,
            }),
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }

    async fn words(
        &mut self,
        what: &str,
        fc: u8,
        address: u16,
        n: u16,
    ) -> Result<Vec<u16>, DriverError> {
        // Through `call`, not the typed readers: those assert the reply's length, and a
        // device that answers with the wrong count must be an error here, not a panic.
        let request = match fc {
            1 => Request::ReadCoils(address, n),
            2 => Request::ReadDiscreteInputs(address, n),
            3 => Request::ReadHoldingRegisters(address, n),
            _ => Request::ReadInputRegisters(address, n),
        };
        let response = self.request(what, async |c| c.call(request).await).await?;
        let words: Vec<u16> = match response {
            Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
                // Bit replies are padded to whole bytes.
                bits.into_iter()
                    .take(usize::from(n))
                    .map(u16::from)
                    .collect()
            }
            Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => w,
            other => {
                return Err(DriverError::Transport {
                    what: what.to_owned(),
                    reason: format!("unexpected reply {other:?}"),
                });
            }
        };
        if words.len() != usize::from(n) {
            return Err(DriverError::Decode {
                what: what.to_owned(),
                source: DecodeError::Length {
                    expected: usize::from(n),
                    got: words.len(),
                },
            });
        }
        Ok(words)
    }

    /// The SunSpec scale-factor exponent of a register (0 without one).
    async fn exponent(&mut self, what: &str, reg: &Register) -> Result<i16, DriverError> {
        let Some(sf) = reg.scale_factor else {
            return Ok(0);
        };
        let address = self.base.wrapping_add(sf);
        let w = self
            .words(&format!("{what} scale factor"), reg.fc, address, 1)
            .await?;
        match w.as_slice() {
            [w] => Ok(*w as i16),
            _ => Err(DriverError::Decode {
                what: format!("{what} scale factor"),
                source: DecodeError::Length {
                    expected: 1,
                    got: w.len(),
                },
            }),
        }
    }

    /// Reads one register of the profile.
    pub async fn read(&mut self, what: &str, reg: &Register) -> Result<Value, DriverError> {
        let words = self
            .words(
                what,
                reg.fc,
                self.base.wrapping_add(reg.address),
                reg.words(),
            )
            .await?;
        let exponent = self.exponent(what, reg).await?;
        reg.decode(&words, exponent)
            .map_err(|source| DriverError::Decode {
                what: what.to_owned(),
                source,
            })
    }

    async fn number(&mut self, what: &str, reg: &Register) -> Result<f64, DriverError> {
        match self.read(what, reg).await? {
            Value::Number(n) => Ok(n),
            Value::Text(t) => Err(DriverError::Decode {
                what: what.to_owned(),
                source: DecodeError::UnknownState(t),
            }),
        }
    }

    /// Writes one register of the profile (a value in its canonical unit).
    pub async fn write(
        &mut self,
        what: &str,
        reg: &Register,
        value: f64,
    ) -> Result<(), DriverError> {
        let exponent = self.exponent(what, reg).await?;
        let words = reg
            .encode(value, exponent)
            .map_err(|source| DriverError::Encode {
                what: what.to_owned(),
                source,
            })?;
        let address = self.base.wrapping_add(reg.address);
        match reg.fc {
            5 => {
                let on = words.first().is_some_and(|w| *w != 0);
                self.request(what, async |c| c.write_single_coil(address, on).await)
                    .await
            }
            6 => {
                let word = words[0];
                self.request(what, async |c| c.write_single_register(address, word).await)
                    .await
            }
            _ => {
                self.request(what, async |c| {
                    c.write_multiple_registers(address, &words).await
                })
                .await
            }
        }
    }

    /// Reads state, power and energy.
    pub async fn poll(&mut self) -> Result<Reading, DriverError> {
        let profile = self.profile.clone();
        let (state, status) = match &profile.status {
            Some(reg) => {
                let value = self.read("status", reg).await?;
                let state = reg.state(&value).map_err(|source| DriverError::Decode {
                    what: "status".into(),
                    source,
                })?;
                let raw = match value {
                    Value::Text(t) => t,
                    Value::Number(n) => format!("{n}"),
                };
                (Some(state), Some(raw))
            }
            None => (None, None),
        };
        let plugged = match &profile.plugged {
            Some(reg) => self.number("plugged", reg).await? != 0.0,
            None => state.is_some_and(IecState::connected),
        };
        // A separate plug register outranks a state register that cannot say "no vehicle".
        let state = match state {
            Some(s) if s.connected() && !plugged => Some(IecState::A),
            other => other,
        };
        let fault = match &profile.fault {
            Some(reg) => self.number("fault", reg).await? != 0.0,
            None => false,
        } || state.is_some_and(IecState::fault);
        let power_w = self.number("power", &profile.power).await?;
        let energy_wh = match &profile.energy {
            Some(reg) => Some(self.number("energy", reg).await?),
            None => None,
        };
        Ok(Reading {
            state,
            status,
            plugged,
            charging: state.is_some_and(IecState::charging) && plugged,
            fault,
            power_w,
            energy_wh,
        })
    }

    /// Applies a current limit: 0 stops charging (and switches the enable off, where the
    /// model has one); otherwise the current, clamped to the charger's range.
    pub async fn set_current(&mut self, amps: f64) -> Result<(), DriverError> {
        let profile = self.profile.clone();
        let setpoint = profile.setpoint.as_ref().ok_or(DriverError::NotACharger)?;
        let on = amps > 0.0;
        let amps = if on {
            amps.clamp(profile.device.min_current_a, profile.device.max_current_a)
        } else {
            0.0
        };
        let value = match profile.setpoint_quantity() {
            Some(Quantity::Power) => profile.watts(amps),
            _ => amps,
        };
        // Switching off goes first and on goes last, so the charger never runs unlimited.
        if let Some(enable) = profile.enable.as_ref().filter(|_| !on) {
            self.write("enable", enable, f64::from(enable.off.unwrap_or(0)))
                .await?;
        }
        self.write("setpoint", setpoint, value).await?;
        if let Some(enable) = profile.enable.as_ref().filter(|_| on) {
            self.write("enable", enable, f64::from(enable.on.unwrap_or(1)))
                .await?;
        }
        Ok(())
    }

    /// Writes the life bit, for models that have one (a setpoint re-write is the caller's,
    /// which knows the setpoint).
    pub async fn life_bit(&mut self) -> Result<(), DriverError> {
        let profile = self.profile.clone();
        let Some(k) = profile
            .keep_alive
            .as_ref()
            .filter(|k| k.mode == KeepAliveMode::LifeBit)
        else {
            return Ok(());
        };
        let Some(reg) = &k.register else {
            return Ok(());
        };
        let values = k.values.clone().unwrap_or_else(|| vec![1]);
        let value = values[self.life % values.len()];
        self.life = self.life.wrapping_add(1);
        self.write("keep-alive", reg, f64::from(value)).await
    }

    /// Writes the failsafe current and timeout, for models where they are settable.
    pub async fn configure_failsafe(&mut self) -> Result<(), DriverError> {
        let profile = self.profile.clone();
        let Some(f) = &profile.failsafe else {
            return Ok(());
        };
        if let Some(reg) = &f.current_register {
            self.write("failsafe current", reg, f.current_a).await?;
        }
        if let Some(reg) = &f.timeout_register {
            self.write("failsafe timeout", reg, f.timeout.as_secs_f64())
                .await?;
        }
        Ok(())
    }

    /// Finds the first of `models` after the "SunS" marker; returns its first point's address.
    async fn sunspec(&mut self, models: &[u16]) -> Result<u16, DriverError> {
        for base in SUNSPEC_BASES {
            let marker = match self.words("SunSpec marker", 3, base, 2).await {
                Ok(w) => w,
                // Devices answer an address they do not have with an exception: try the next.
                Err(DriverError::Exception { .. }) => continue,
                Err(e) => return Err(e),
            };
            if marker != [0x5375, 0x6e53] {
                continue;
            }
            let mut at = base + 2;
            // A SunSpec map is a chain of (id, length) headers ending in id 0xFFFF.
            for _ in 0..64 {
                let header = self.words("SunSpec model header", 3, at, 2).await?;
                let [id, len] = header[..] else {
                    break;
                };
                if id == 0xffff {
                    break;
                }
                if models.contains(&id) {
                    return Ok(at + 2);
                }
                at = match at.checked_add(2 + len) {
                    Some(next) => next,
                    None => break,
                };
            }
        }
        Err(DriverError::Discover {
            models: models.to_vec(),
        })
    }
}
