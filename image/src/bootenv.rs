//! A/B boot control: which root slot boots, RAUC-style.
//!
//! The bootloader environment holds `ORDER` (slots by preference), and per slot `X_OK`
//! (a boot of it passed the depot's self-test) and `X_TRY` (one trial boot is armed). The
//! bootloader (`image/grub/grub.cfg`) boots the first slot of `ORDER` that is armed, consuming
//! the trial before it boots, or else the first that is good. So:
//!
//! - `install` writes the inactive slot, then arms it: `ORDER` puts it first, its `OK` is 0
//!   and its `TRY` 1;
//! - the next boot tries it once; the depot, once its self-test passes, marks it good;
//! - a trial that never marks good (kernel panic, hang, failed self-test) is not booted again:
//!   the next boot takes the previous good slot.
//!
//! The decisions are pure functions of the variables; [`BootEnv`] reads and writes them.
//! [`GrubEnv`] does that through `grub-editenv` (`image/grub/grub.cfg` decides at power-on);
//! [`UBootEnv`] through libubootenv's `fw_printenv`/`fw_setenv`, for boards that boot with
//! U-Boot (`image/uboot/boot.cmd` decides the same way there).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Self {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "A" | "a" => Some(Slot::A),
            "B" | "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.letter())
    }
}

/// The slot the running system booted from, as the bootloader told the kernel
/// (`atlasmesh.slot=A` on the command line).
pub fn booted_slot(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix("atlasmesh.slot="))
        .and_then(Slot::parse)
}

/// The boot variables, with the bootloader script's defaults for missing ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    pub order: Vec<Slot>,
    pub ok: [bool; 2],
    pub tries: [bool; 2],
}

fn index(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

impl BootState {
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Self {
        let flag =
            |name: &str, default: bool| vars.get(name).map(|v| v.trim() == "1").unwrap_or(default);
        let order = vars
            .get("ORDER")
            .map(|o| o.split_whitespace().filter_map(Slot::parse).collect())
            .unwrap_or_else(|| vec![Slot::A, Slot::B]);
        Self {
            order,
            ok: [flag("A_OK", true), flag("B_OK", false)],
            tries: [flag("A_TRY", false), flag("B_TRY", false)],
        }
    }

    pub fn to_vars(&self) -> Vec<(String, String)> {
        let bit = |b: bool| if b { "1" } else { "0" }.to_owned();
        let order: Vec<&str> = self.order.iter().map(|s| s.letter()).collect();
        vec![
            ("ORDER".into(), order.join(" ")),
            ("A_OK".into(), bit(self.ok[0])),
            ("A_TRY".into(), bit(self.tries[0])),
            ("B_OK".into(), bit(self.ok[1])),
            ("B_TRY".into(), bit(self.tries[1])),
        ]
    }

    pub fn is_good(&self, slot: Slot) -> bool {
        self.ok[index(slot)]
    }
    pub fn is_armed(&self, slot: Slot) -> bool {
        self.tries[index(slot)]
    }

    fn first(&mut self, slot: Slot) {
        self.order.retain(|s| *s != slot);
        self.order.insert(0, slot);
        if !self.order.contains(&slot.other()) {
            self.order.push(slot.other());
        }
    }

    /// Before a slot is overwritten: it must not boot while it is half written.
    pub fn disable(&mut self, slot: Slot) {
        self.ok[index(slot)] = false;
        self.tries[index(slot)] = false;
    }

    /// After a slot was written and verified: boot it once, first.
    pub fn arm_try(&mut self, slot: Slot) {
        self.first(slot);
        self.ok[index(slot)] = false;
        self.tries[index(slot)] = true;
    }

    /// The running slot passed its self-test: keep booting it. When the other slot is armed
    /// for a trial (an update was installed and the reboot is still to come), the order is
    /// left alone, or the pending trial would never be booted.
    pub fn mark_good(&mut self, slot: Slot) {
        if !self.is_armed(slot.other()) {
            self.first(slot);
        }
        self.ok[index(slot)] = true;
        self.tries[index(slot)] = false;
    }

    /// What the bootloader does at power-on (grub.cfg's logic, for tests and `status`):
    /// the slot it boots; the state is updated as the bootloader saves it.
    pub fn boot(&mut self) -> Slot {
        for slot in self.order.clone() {
            if self.tries[index(slot)] {
                self.tries[index(slot)] = false;
                return slot;
            }
            if self.ok[index(slot)] {
                return slot;
            }
        }
        Slot::A
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootEnvError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed on {file}: {stderr}")]
    Failed {
        program: String,
        file: String,
        stderr: String,
    },
}

/// The bootloader's environment: read all variables, set some.
pub trait BootEnv {
    fn read(&self) -> Result<BTreeMap<String, String>, BootEnvError>;
    fn write(&self, vars: &[(String, String)]) -> Result<(), BootEnvError>;
    fn describe(&self) -> String;

    fn state(&self) -> Result<BootState, BootEnvError> {
        Ok(BootState::from_vars(&self.read()?))
    }
    fn store(&self, state: &BootState) -> Result<(), BootEnvError> {
        self.write(&state.to_vars())
    }
}

/// GRUB's environment block, through `grub-editenv`, so the file is always in the exact
/// format and size GRUB's `load_env`/`save_env` expect.
#[derive(Debug, Clone)]
pub struct GrubEnv {
    pub file: PathBuf,
    pub editenv: PathBuf,
}

impl GrubEnv {
    pub fn new(file: &Path) -> Self {
        Self {
            file: file.to_owned(),
            editenv: PathBuf::from("grub-editenv"),
        }
    }

    fn run(&self, args: &[String]) -> Result<String, BootEnvError> {
        let mut command = Command::new(&self.editenv);
        command.arg(&self.file).args(args);
        run_tool(command, &self.editenv, &self.file)
    }
}

/// Runs a bootloader tool about `file` and returns what it printed.
fn run_tool(mut command: Command, program: &Path, file: &Path) -> Result<String, BootEnvError> {
    let program = program.display().to_string();
    let output = command.output().map_err(|source| BootEnvError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(BootEnvError::Failed {
            program,
            file: file.display().to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `NAME=VALUE` lines, as both bootloaders' tools list their variables.
fn parse_vars(listing: &str) -> BTreeMap<String, String> {
    listing
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl BootEnv for GrubEnv {
    fn read(&self) -> Result<BTreeMap<String, String>, BootEnvError> {
        Ok(parse_vars(&self.run(&["list".into()])?))
    }

    fn write(&self, vars: &[(String, String)]) -> Result<(), BootEnvError> {
        let mut args = vec!["set".to_owned()];
        args.extend(vars.iter().map(|(k, v)| format!("{k}={v}")));
        self.run(&args).map(drop)
    }

    fn describe(&self) -> String {
        format!("GRUB environment block {}", self.file.display())
    }
}

/// U-Boot's environment, through libubootenv's `fw_printenv` and `fw_setenv` with their
/// configuration file (`/etc/fw_env.config`: the device or file holding the environment, its
/// offset and size, and the redundant copy's where the board has one). The tools check the
/// environment's CRC and refuse a damaged one rather than guess; `fw_setenv` sets all the
/// variables of one change in a single write of the environment (with a redundant copy, the
/// old one stays valid until the new one is complete), as a state change must not be torn.
#[derive(Debug, Clone)]
pub struct UBootEnv {
    pub config: PathBuf,
    pub printenv: PathBuf,
    pub setenv: PathBuf,
}

impl UBootEnv {
    pub fn new(config: &Path) -> Self {
        Self {
            config: config.to_owned(),
            printenv: PathBuf::from("fw_printenv"),
            setenv: PathBuf::from("fw_setenv"),
        }
    }
}

impl BootEnv for UBootEnv {
    fn read(&self) -> Result<BTreeMap<String, String>, BootEnvError> {
        let mut command = Command::new(&self.printenv);
        command.arg("-c").arg(&self.config);
        Ok(parse_vars(&run_tool(
            command,
            &self.printenv,
            &self.config,
        )?))
    }

    fn write(&self, vars: &[(String, String)]) -> Result<(), BootEnvError> {
        let mut command = Command::new(&self.setenv);
        command.arg("-c").arg(&self.config);
        for (k, v) in vars {
            command.arg(k).arg(v);
        }
        run_tool(command, &self.setenv, &self.config).map(drop)
    }

    fn describe(&self) -> String {
        format!(
            "U-Boot environment (libubootenv, {})",
            self.config.display()
        )
    }
}

/// A fresh GRUB environment block (1024 bytes: a header line, `KEY=VALUE` lines, `#`
/// padding), for images built without GRUB's tools at hand.
pub fn grubenv_block(vars: &[(String, String)]) -> Vec<u8> {
    let mut block = b"# GRUB Environment Block\n".to_vec();
    for (k, v) in vars {
        block.extend_from_slice(format!("{k}={v}\n").as_bytes());
    }
    assert!(
        block.len() <= 1024,
        "boot variables fit a GRUB environment block"
    );
    block.resize(1024, b'#');
    block
}

/// The variables of a factory image: both slots hold the same root file system, A first.
pub fn factory_state() -> BootState {
    BootState {
        order: vec![Slot::A, Slot::B],
        ok: [true, true],
        tries: [false, false],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_that_never_marks_good_falls_back_and_one_that_does_stays() {
        let mut state = factory_state();
        assert_eq!(state.boot(), Slot::A);
        state.disable(Slot::B);
        state.arm_try(Slot::B);
        assert_eq!(state.boot(), Slot::B, "the armed slot is tried");
        // No mark-good (it hung): the next boot is the old slot, and so is every later one.
        assert_eq!(state.boot(), Slot::A);
        assert_eq!(state.boot(), Slot::A);
        state.mark_good(Slot::A);
        assert_eq!(state.order, [Slot::A, Slot::B]);

        state.arm_try(Slot::B);
        // The depot restarts on A before the reboot: confirming A must not cancel B's trial.
        state.mark_good(Slot::A);
        assert_eq!(state.order, [Slot::B, Slot::A]);
        assert_eq!(state.boot(), Slot::B);
        state.mark_good(Slot::B);
        assert_eq!(state.boot(), Slot::B);
        assert_eq!(state.boot(), Slot::B);
    }

    #[test]
    fn reads_the_slot_from_the_kernel_command_line_and_vars_round_trip() {
        assert_eq!(
            booted_slot("ro root=PARTLABEL=root_b atlasmesh.slot=B quiet"),
            Some(Slot::B)
        );
        assert_eq!(booted_slot("ro root=/dev/vda"), None);
        let state = BootState {
            order: vec![Slot::B, Slot::A],
            ok: [true, false],
            tries: [false, true],
        };
        let vars: BTreeMap<_, _> = state.to_vars().into_iter().collect();
        assert_eq!(BootState::from_vars(&vars), state);
        // A missing block means the factory defaults of grub.cfg: A good, B not.
        assert_eq!(BootState::from_vars(&BTreeMap::new()).boot(), Slot::A);
        let block = grubenv_block(&state.to_vars());
        assert_eq!(block.len(), 1024);
        assert!(block.starts_with(b"# GRUB Environment Block\nORDER=B A\n"));
    }
}
