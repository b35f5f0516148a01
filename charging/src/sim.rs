//! Simulated chargers and meters for demos and tests: a Modbus TCP server (tokio-modbus'
//! server side) that lays out any [`Profile`]'s registers and keeps them true to a simulated
//! vehicle behind the charger: power follows the setpoint, the state of charge rises, and a
//! keep-alive that stops drops the charger to its failsafe current, as the real model does.
//!
//! The register encoding is the profile's own ([`Register::encode`]), so the simulator is
//! for demonstrations and the depot's own end-to-end tests; the profiles themselves are
//! checked against an independent Modbus implementation (pymodbus) in the test suite.

use std::collections::HashMap;
use std::future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_util::sync::CancellationToken;

use crate::profile::{DataType, IecState, KeepAliveMode, Kind, Profile, Quantity, Register};

/// SunSpec exponent the simulator uses for scaled points (10 W, 10 Wh resolution).
const SIM_EXPONENT: i16 = 1;

/// Where a simulated SunSpec map starts, and the layout it announces.
const SUNSPEC_BASE: u16 = 40000;
const SUNSPEC_COMMON_LEN: u16 = 66;
const SUNSPEC_METER_LEN: u16 = 105;

/// The vehicle behind a simulated charger.
#[derive(Debug, Clone, PartialEq)]
pub struct SimVehicle {
    pub soc_percent: f64,
    pub battery_kwh: f64,
    /// The vehicle's on-board charger limit, kW.
    pub max_kw: f64,
}

/// A simulated device's physical state.
#[derive(Debug)]
pub struct SimState {
    pub vehicle: Option<SimVehicle>,
    /// For meters: the site's load without the chargers, W.
    pub base_load_w: f64,
    /// Power delivered now, W.
    pub power_w: f64,
    /// Energy since the vehicle plugged in (chargers) or in total (meters), Wh.
    pub energy_wh: f64,
    /// Current the charger applies now, A (the setpoint, or the failsafe current).
    pub applied_a: f64,
    /// Whether the failsafe is in force (keep-alive expired).
    pub failsafe: bool,
    last_keep_alive: Instant,
    last_step: Instant,
    /// Holding (3), input (4), coil (1) and discrete-input (2) tables.
    tables: HashMap<(u8, u16), u16>,
    /// Setpoint and enable as last written.
    setpoint: f64,
    enabled: bool,
}

/// Table a function code addresses.
fn table(fc: u8) -> u8 {
    match fc {
        5 => 1,
        6 | 16 => 3,
        other => other,
    }
}

/// One simulated device; clone the handle to watch or steer it.
#[derive(Clone)]
pub struct SimDevice {
    profile: Arc<Profile>,
    state: Arc<Mutex<SimState>>,
}

impl SimDevice {
    pub fn new(profile: Arc<Profile>, vehicle: Option<SimVehicle>) -> SimDevice {
        let now = Instant::now();
        let state = SimState {
            vehicle,
            base_load_w: 0.0,
            power_w: 0.0,
            energy_wh: 0.0,
            applied_a: 0.0,
            failsafe: false,
            last_keep_alive: now,
            last_step: now,
            tables: HashMap::new(),
            // A charger powers up at its failsafe current until the depot says otherwise.
            setpoint: profile.failsafe.as_ref().map_or(0.0, |f| f.current_a),
            enabled: true,
        };
        let device = SimDevice {
            profile,
            state: Arc::new(Mutex::new(state)),
        };
        device.with(|_| ());
        device
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Advances the simulation to now, lets `f` look or change, and re-lays the registers.
    pub fn with<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.step(&mut s);
        self.layout(&mut s);
        let out = f(&mut s);
        // A write may have changed what flows: settle it before anyone reads again.
        self.step(&mut s);
        self.layout(&mut s);
        out
    }

    fn step(&self, s: &mut SimState) {
        let now = Instant::now();
        let hours = now.duration_since(s.last_step).as_secs_f64() / 3600.0;
        s.last_step = now;
        if self.profile.device.kind == Kind::Meter {
            s.power_w = s.base_load_w;
            s.energy_wh += s.power_w * hours;
            return;
        }
        // Energy of the last interval at the power that was flowing.
        let delivered_wh = s.power_w * hours;
        s.energy_wh += delivered_wh;
        if let Some(v) = &mut s.vehicle {
            v.soc_percent =
                (v.soc_percent + delivered_wh / 1000.0 / v.battery_kwh * 100.0).min(100.0);
        }
        let timeout = self.profile.failsafe.as_ref().map(|f| f.timeout);
        s.failsafe = self.profile.keep_alive.is_some()
            && timeout.is_some_and(|t| now.duration_since(s.last_keep_alive) > t);
        s.applied_a = if s.failsafe {
            self.profile.failsafe.as_ref().map_or(0.0, |f| f.current_a)
        } else if s.enabled {
            match self.profile.setpoint_quantity() {
                Some(Quantity::Power) => self.profile.amps(s.setpoint),
                _ => s.setpoint,
            }
        } else {
            0.0
        };
        let on = s.applied_a >= self.profile.device.min_current_a - 1e-9;
        s.power_w = match &s.vehicle {
            Some(v) if on && v.soc_percent < 100.0 => {
                self.profile.watts(s.applied_a).min(v.max_kw * 1000.0)
            }
            _ => 0.0,
        };
    }

    /// Plugs a vehicle in (a new session) or unplugs it.
    pub fn plug(&self, vehicle: Option<SimVehicle>) {
        self.with(|s| {
            if s.vehicle.is_none() && vehicle.is_some() {
                s.energy_wh = 0.0;
            }
            s.vehicle = vehicle;
        });
    }

    fn put(s: &mut SimState, reg: &Register, base: u16, value: f64) {
        let exponent = if reg.scale_factor.is_some() {
            SIM_EXPONENT
        } else {
            0
        };
        let words = match reg.data_type {
            DataType::Ascii => ascii_words(reg, &format!("{value}")),
            _ => reg
                .encode(value, exponent)
                .unwrap_or_else(|_| vec![0; usize::from(reg.words())]),
        };
        Self::put_words(s, reg, base, &words);
        if let Some(sf) = reg.scale_factor {
            s.tables
                .insert((table(reg.fc), base.wrapping_add(sf)), exponent as u16);
        }
    }

    fn put_words(s: &mut SimState, reg: &Register, base: u16, words: &[u16]) {
        for (i, w) in words.iter().enumerate() {
            let address = base.wrapping_add(reg.address).wrapping_add(i as u16);
            s.tables.insert((table(reg.fc), address), *w);
        }
    }

    /// The raw value a status register needs to read as `state`.
    fn status_words(reg: &Register, state: IecState) -> Vec<u16> {
        match (state, reg.data_type) {
            (IecState::B, DataType::Ascii) => ascii_words(reg, "B2"),
            (IecState::C, DataType::Ascii) => ascii_words(reg, "C2"),
            (s, DataType::Ascii) => ascii_words(reg, &s.to_string()),
            (s, _) => {
                let raw = reg.states.as_ref().and_then(|m| {
                    m.iter()
                        .find(|(_, v)| IecState::parse(v) == Some(s))
                        .and_then(|(k, _)| k.parse::<u64>().ok())
                });
                raw_words(reg, raw.unwrap_or(0) << reg.shift.unwrap_or(0))
            }
        }
    }

    fn flag_words(reg: &Register, on: bool) -> Vec<u16> {
        let raw = if on {
            reg.mask.unwrap_or(1) << reg.shift.unwrap_or(0)
        } else {
            0
        };
        raw_words(reg, raw)
    }

    /// Lays the state out in the registers the profile names.
    fn layout(&self, s: &mut SimState) {
        let p = &self.profile;
        let mut base = 0;
        if let Some(discover) = &p.discover {
            let model = discover.sunspec_models[0];
            let header = [0x5375, 0x6e53, 1, SUNSPEC_COMMON_LEN];
            for (i, w) in header.iter().enumerate() {
                s.tables.insert((3, SUNSPEC_BASE + i as u16), *w);
            }
            let at = SUNSPEC_BASE + 4 + SUNSPEC_COMMON_LEN;
            s.tables.insert((3, at), model);
            s.tables.insert((3, at + 1), SUNSPEC_METER_LEN);
            s.tables.insert((3, at + 2 + SUNSPEC_METER_LEN), 0xffff);
            s.tables.insert((3, at + 3 + SUNSPEC_METER_LEN), 0);
            base = at + 2;
        }
        if let Some(status) = &p.status {
            let state = match &s.vehicle {
                None => IecState::A,
                Some(_) if s.power_w > 0.0 => IecState::C,
                Some(_) => IecState::B,
            };
            let words = Self::status_words(status, state);
            Self::put_words(s, status, base, &words);
        }
        if let Some(plugged) = &p.plugged {
            let words = Self::flag_words(plugged, s.vehicle.is_some());
            Self::put_words(s, plugged, base, &words);
        }
        if let Some(fault) = &p.fault {
            let words = Self::flag_words(fault, false);
            Self::put_words(s, fault, base, &words);
        }
        Self::put(s, &p.power, base, s.power_w);
        if let Some(energy) = &p.energy {
            Self::put(s, energy, base, s.energy_wh);
        }
    }

    /// Applies a write the way the device would.
    fn written(&self, s: &mut SimState, fc: u8, address: u16, words: &[u16]) {
        let p = &self.profile;
        for (i, w) in words.iter().enumerate() {
            s.tables
                .insert((table(fc), address.wrapping_add(i as u16)), *w);
        }
        let hits = |reg: &Register| table(reg.fc) == table(fc) && reg.address == address;
        if let Some(setpoint) = p.setpoint.as_ref().filter(|r| hits(r)) {
            if let Ok(crate::profile::Value::Number(v)) = setpoint.decode(words, 0) {
                s.setpoint = v;
            }
            if p.keep_alive
                .as_ref()
                .is_some_and(|k| k.mode == KeepAliveMode::Rewrite)
            {
                s.last_keep_alive = Instant::now();
            }
        }
        if let Some(enable) = p.enable.as_ref().filter(|r| hits(r)) {
            s.enabled = words.first().copied() != Some(enable.off.unwrap_or(0));
        }
        if let Some(k) = &p.keep_alive
            && k.mode == KeepAliveMode::LifeBit
            && k.register.as_ref().is_some_and(hits)
        {
            s.last_keep_alive = Instant::now();
        }
    }

    fn handle(&self, req: Request<'_>) -> Result<Response, ExceptionCode> {
        self.with(|s| {
            let read =
                |s: &SimState, t: u8, address: u16, n: u16| -> Result<Vec<u16>, ExceptionCode> {
                    (0..n)
                        .map(|i| {
                            s.tables
                                .get(&(t, address.wrapping_add(i)))
                                .copied()
                                .ok_or(ExceptionCode::IllegalDataAddress)
                        })
                        .collect()
                };
            match req {
                Request::ReadHoldingRegisters(a, n) => {
                    read(s, 3, a, n).map(Response::ReadHoldingRegisters)
                }
                Request::ReadInputRegisters(a, n) => {
                    read(s, 4, a, n).map(Response::ReadInputRegisters)
                }
                Request::ReadCoils(a, n) => read(s, 1, a, n)
                    .map(|w| Response::ReadCoils(w.into_iter().map(|b| b != 0).collect())),
                Request::ReadDiscreteInputs(a, n) => read(s, 2, a, n)
                    .map(|w| Response::ReadDiscreteInputs(w.into_iter().map(|b| b != 0).collect())),
                Request::WriteSingleRegister(a, w) => {
                    self.written(s, 6, a, &[w]);
                    Ok(Response::WriteSingleRegister(a, w))
                }
                Request::WriteMultipleRegisters(a, words) => {
                    self.written(s, 16, a, &words);
                    Ok(Response::WriteMultipleRegisters(a, words.len() as u16))
                }
                Request::WriteSingleCoil(a, on) => {
                    self.written(s, 5, a, &[u16::from(on)]);
                    Ok(Response::WriteSingleCoil(a, on))
                }
                _ => Err(ExceptionCode::IllegalFunction),
            }
        })
    }

    /// Serves the device on `listener` until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let server = Server::new(listener);
        let device = self;
        let new_service = move |_addr: SocketAddr| Ok(Some(Connection(device.clone())));
        let on_connected = |stream, addr| {
            let new_service = new_service.clone();
            async move { accept_tcp_connection(stream, addr, new_service) }
        };
        server
            .serve_until(&on_connected, |_err| {}, async move {
                shutdown.cancelled().await
            })
            .await
            .map(|_| ())
    }

    /// Steps the simulation regularly so energy accrues between polls.
    pub async fn run_physics(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => self.with(|_| ()),
                () = shutdown.cancelled() => return,
            }
        }
    }
}

struct Connection(SimDevice);

impl Service for Connection {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        future::ready(self.0.handle(req.request))
    }
}

/// An integer's registers in the register's word order (no scaling: bit fields and codes).
fn raw_words(reg: &Register, raw: u64) -> Vec<u16> {
    let n = usize::from(reg.words());
    let mut words: Vec<u16> = (0..n).rev().map(|i| (raw >> (16 * i)) as u16).collect();
    if reg.word_order == crate::profile::WordOrder::LowFirst {
        words.reverse();
    }
    words
}

/// Text padded with NULs to the register's length.
fn ascii_words(reg: &Register, text: &str) -> Vec<u16> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(usize::from(reg.words()) * 2, 0);
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}
