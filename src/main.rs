//! `position-state-brain`: parse the command line and the environment, set up
//! logging, run the daemon until SIGTERM/SIGINT, exit 0 / 78 / 1 (SPEC §10);
//! a usage error exits 64.

use std::sync::Arc;

use clap::Parser;
use position_state_brain::app::lifecycle::{self, Cli, Command, EXIT_USAGE, VERSION};
use position_state_brain::config::{Config, EXIT_CONFIG};
use position_state_brain::observe::{metrics::Metrics, telemetry};
use position_state_brain::operator::{ctl, explain, replay};
use tokio_util::sync::CancellationToken;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => EXIT_USAGE,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // `acl` reads only its password files.
    if let Some(Command::Acl(args)) = &cli.command {
        std::process::exit(position_state_brain::operator::acl::run(args));
    }
    // The subcommands need only the Redis settings (SPEC §12): an operator
    // halts trading from a shell that holds no exchange secret.
    let read = if cli.command.is_some() {
        Config::tools_from_env()
    } else if cli.check_config {
        Config::check_from_env()
    } else {
        Config::from_env()
    };
    let cfg = match read {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if let Some(command) = cli.command {
        let code = match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(async {
                match command {
                    Command::Ctl(args) => ctl::run(&cfg, args).await,
                    Command::Explain { plan_id } => explain::run(&cfg, &plan_id).await,
                    Command::Replay(args) => replay::run(args).await,
                    Command::Acl(args) => position_state_brain::operator::acl::run(&args),
                }
            }),
            Err(e) => {
                eprintln!("fatal: cannot start the async runtime: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    if cli.check_config {
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_none_or(|d| d.is_empty()) {
            println!(
                "# CREDENTIALS_DIRECTORY is unset (not the unit): credentials read as the unit loads them, the first of {} (position-state-brain.<name>)",
                position_state_brain::config::CREDSTORE_DIRS.join(", ")
            );
        }
        for (k, v) in cfg.effective() {
            println!("{k}={v}");
        }
        for w in cfg.warnings() {
            println!("WARN {w}");
        }
        return println!("configuration OK (position-state-brain {VERSION})");
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
                Err(e) if e.is::<lifecycle::NoPermission>() => {
                    tracing::error!("fatal: {e:#}");
                    78
                }
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
