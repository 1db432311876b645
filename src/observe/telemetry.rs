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

use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The syslog priority of a level (`sd-daemon(3)` prefixes): ERROR 3,
/// WARN 4, INFO 6, DEBUG and TRACE 7.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// A text line format that starts each line with its syslog priority
/// (`<4>`) when `prefix` is on — under systemd, so that `journalctl -p
/// warning` separates WARN from INFO (SPEC §10); the rest of the line is the
/// inner format's, unchanged.
struct Prioritized<F> {
    inner: F,
    prefix: bool,
}

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.prefix {
            write!(writer, "<{}>", priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// The libraries that print a credential below INFO: the WebSocket client
/// logs its URL (with the listenKey) and its request at DEBUG and TRACE,
/// and every frame it receives (a `listenKeyExpired` names the key); the
/// HTTP stack is capped with it.
pub const CAPPED_TARGETS: [&str; 6] = [
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
];

/// `filter` with [`CAPPED_TARGETS`] held at INFO whatever it asks (SPEC
/// §17: no credential in any output at any log level): a directive of its
/// own for one of them is dropped, the cap appended.
pub fn capped(filter: &str) -> String {
    let mut parts: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let target = d.split(['=', '[']).next().unwrap_or("");
            !CAPPED_TARGETS
                .iter()
                .any(|t| target == *t || target.starts_with(&format!("{t}::")))
        })
        .collect();
    let caps: Vec<String> = CAPPED_TARGETS.iter().map(|t| format!("{t}=info")).collect();
    parts.extend(caps.iter().map(String::as_str));
    parts.join(",")
}

/// Installs the global subscriber. `filter` is a `tracing` directive
/// (validated by the config).
pub fn init(filter: &str, format: LogFormat) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(200_000)
        .lossy(true)
        .finish(std::io::stdout());
    let filter = EnvFilter::try_new(capped(filter)).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    // journald sets JOURNAL_STREAM for the services whose stdout it reads.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let res = match format {
        LogFormat::Text => builder
            .event_format(Prioritized {
                inner: tracing_subscriber::fmt::format().with_ansi(false),
                prefix: under_journald,
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libraries_that_print_credentials_stay_at_info() {
        for (asked, want) in [
            ("trace", "trace,tungstenite=info,tokio_tungstenite=info,hyper=info,hyper_util=info,reqwest=info,h2=info"),
            (
                "info,tungstenite=trace,tungstenite::client=trace,position_state_brain=debug",
                "info,position_state_brain=debug,tungstenite=info,tokio_tungstenite=info,hyper=info,hyper_util=info,reqwest=info,h2=info",
            ),
        ] {
            assert_eq!(capped(asked), want, "{asked}");
            assert!(EnvFilter::try_new(capped(asked)).is_ok());
        }
    }
}
