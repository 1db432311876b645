//! Logging: `tracing` to stdout (journald), text or JSON.
//!
//! Lines go through a non-blocking writer with a large buffer, so a slow
//! stdout (journald under load) never stalls plan handling; if the buffer
//! ever fills, lines are dropped rather than the daemon blocked. The returned
//! guard flushes what is buffered when `main` drops it.
//!
//! Events may carry structured fields (`symbol`, `plan`, `reason`) for JSON
//! logs; the text format prints the message alone, so the SPEC's text lines
//! (`P3.3 allowlist source=…`, `… P3.3 ALLOW plan …`) stay exactly as
//! operators grep them.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `filter` is a `tracing` directive
/// (validated by the config).
pub fn init(filter: &str, format: LogFormat) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(200_000)
        .lossy(true)
        .finish(std::io::stdout());
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    let res = match format {
        LogFormat::Text => builder
            .fmt_fields(tracing_subscriber::fmt::format::debug_fn(
                |w, field, value| {
                    if field.name() == "message" {
                        write!(w, "{value:?}")
                    } else {
                        Ok(())
                    }
                },
            ))
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = res {
        eprintln!("logging already initialised: {e}");
    }
    guard
}
