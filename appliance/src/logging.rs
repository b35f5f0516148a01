//! Structured logs through tracing: JSON lines (the runbooks' golden rule) unless a person is
//! watching a terminal, with the
//! current request's span fields (request id, trace id) on every line logged inside it.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter `{0}`: {1}")]
    Filter(String, String),
    #[error("logging was already set up")]
    AlreadySet,
}

/// Installs the global subscriber. Logs go to stderr, keeping stdout for command output.
pub fn init(config: &LogConfig) -> Result<(), LogError> {
    // The embedded broker logs every ordinary disconnect as an error; the link and the broker's
    // front log what a depot's reader needs (refusals, lost connections, dropped messages).
    // Naming `rumqttd` in the level brings its own lines back for debugging.
    let level = if config.level.contains("rumqttd") {
        config.level.clone()
    } else {
        format!("{},rumqttd=off", config.level)
    };
    let filter = EnvFilter::try_new(&level)
        .map_err(|e| LogError::Filter(config.level.clone(), e.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let result = match json {
        true => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        false => builder.try_init(),
    };
    result.map_err(|_| LogError::AlreadySet)
}
