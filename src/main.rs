//! `position-state-brain`: parse the command line and the environment, set up
//! logging, run the daemon until SIGTERM/SIGINT, exit 0 / 78 / 1 (SPEC §10).

use std::sync::Arc;

use position_state_brain::config::{Config, EXIT_CONFIG};
use position_state_brain::lifecycle::{self, Cli};
use position_state_brain::{metrics::Metrics, telemetry};
use tokio_util::sync::CancellationToken;

fn main() {
    let cli = lifecycle::parse_cli(std::env::args().skip(1));
    match cli {
        Cli::Help => return print!("{}", lifecycle::USAGE),
        Cli::Version => return println!("position-state-brain {}", env!("CARGO_PKG_VERSION")),
        Cli::Bad(a) => {
            eprintln!("unknown argument: {a}\n\n{}", lifecycle::USAGE);
            std::process::exit(EXIT_CONFIG);
        }
        Cli::Run | Cli::CheckConfig => {}
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if cli == Cli::CheckConfig {
        for (k, v) in cfg.effective() {
            println!("{k}={v}");
        }
        return println!("configuration OK");
    }
    let guard = telemetry::init(&cfg.log_filter, cfg.log_format);
    let code = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(async {
            let shutdown = CancellationToken::new();
            if let Err(e) = lifecycle::cancel_on_signals(shutdown.clone()) {
                tracing::error!("cannot install signal handlers: {e}");
                return 1;
            }
            match lifecycle::run(Arc::new(cfg), Arc::new(Metrics::new()), shutdown).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("fatal: {e:#}");
                    1
                }
            }
        }),
        Err(e) => {
            eprintln!("fatal: cannot start the async runtime: {e}");
            1
        }
    };
    drop(guard);
    std::process::exit(code);
}
