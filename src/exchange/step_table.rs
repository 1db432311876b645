//! The step-size table (SPEC §5 "Step size", §10): loaded from exchangeInfo
//! at start and hourly, saved to `quantum:p33:step_sizes`, and that saved
//! table read before the first plan.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::domain::{dec_str, parse_dec, valid_step};
use crate::gate::steps::StepSizes;
use crate::observe::metrics::Metrics;
use crate::redis::keys;
use crate::redis::store;

use super::Client;

/// How often step sizes are reloaded.
pub const STEP_REFRESH: Duration = Duration::from_secs(3600);
/// Retry period after a failed exchangeInfo load.
pub const STEP_RETRY: Duration = Duration::from_secs(30);

/// Saves the step table to `quantum:p33:step_sizes` (replacing it in one
/// transaction), so a restart without a route to the exchange keeps real
/// steps instead of the 0.001 fallback.
async fn save_steps(
    con: &mut crate::redis::store::Conn,
    table: &HashMap<String, Decimal>,
) -> Result<(), redis::RedisError> {
    let mut p = redis::pipe();
    p.atomic().del(keys::STEP_SIZES).ignore();
    if !table.is_empty() {
        let pairs: Vec<(&str, String)> = table
            .iter()
            .map(|(s, d)| (s.as_str(), dec_str(*d)))
            .collect();
        p.hset_multiple(keys::STEP_SIZES, &pairs).ignore();
    }
    p.query_async(con).await
}

/// The last good table from `quantum:p33:step_sizes`; entries that are not
/// valid symbols or steps are left out, and a key of another type is no
/// table (empty, with a WARN).
pub async fn load_saved_steps(
    con: &mut crate::redis::store::Conn,
) -> Result<HashMap<String, Decimal>, redis::RedisError> {
    let raw: HashMap<String, String> = match redis::cmd("HGETALL")
        .arg(keys::STEP_SIZES)
        .query_async(con)
        .await
    {
        Ok(r) => r,
        Err(e) if e.code() == Some("WRONGTYPE") => {
            warn!(
                "step sizes: {} holds another type; no saved table",
                keys::STEP_SIZES
            );
            return Ok(HashMap::new());
        }
        Err(e) => return Err(e),
    };
    Ok(raw
        .into_iter()
        .filter(|(s, _)| keys::valid_symbol(s))
        .filter_map(|(s, v)| Some((s, parse_dec(&v).filter(|d| valid_step(*d))?)))
        .collect())
}

/// Loads step sizes at start and hourly; a failed load keeps the last good
/// table and retries sooner. Each good table is saved to Redis; when the
/// exchange cannot be reached and no table is loaded yet, the saved one is
/// used (SPEC §5 "Step size": 0.001 is the fallback of last resort).
pub async fn run_step_sizes(
    cfg: Arc<Config>,
    redis: store::Redis,
    steps: StepSizes,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let client = match Client::new(&cfg, metrics) {
        Ok(c) => c,
        Err(e) => {
            warn!("step sizes: cannot build the HTTP client: {e}; using 0.001 for every symbol");
            return cancel.cancelled().await;
        }
    };
    let Some(mut con) = redis
        .connect("step sizes", Duration::from_secs(5), &cancel)
        .await
    else {
        return;
    };
    // Only for the log line: userinfo in the base URL is a credential.
    let url =
        crate::text::redact_userinfo(&format!("{}/fapi/v1/exchangeInfo", cfg.exchange_base_url))
            .into_owned();
    let mut failures = 0u64;
    // The saved table, loaded before the first plan (lifecycle), counts.
    let mut have_table = !steps.is_empty();
    loop {
        let wait = match client.step_sizes().await {
            Ok(t) => {
                info!(
                    "step sizes loaded for {} symbols from exchangeInfo",
                    t.len()
                );
                // A dry run writes nothing the live pipeline reads.
                let saved = if cfg.dry_run {
                    Ok(())
                } else {
                    save_steps(&mut con, &t).await
                };
                if let Err(e) = saved {
                    warn!(
                        "step sizes: saving them to {} failed: {e}",
                        keys::STEP_SIZES
                    );
                }
                steps.set(t);
                have_table = true;
                failures = 0;
                STEP_REFRESH
            }
            Err(e) => {
                failures += 1;
                // An exchange that stays away (external mode without one) is
                // named a few times, then every 20th try, not every 30 s.
                if failures <= 3 || failures.is_multiple_of(20) {
                    warn!(
                        "step sizes: GET {url} failed ({failures} in a row): {e}; {}",
                        if have_table {
                            "keeping the last table"
                        } else {
                            "no table yet"
                        }
                    );
                }
                if !have_table {
                    match load_saved_steps(&mut con).await {
                        Ok(t) if !t.is_empty() => {
                            info!(
                                "step sizes: using the {} saved in {} until exchangeInfo answers",
                                t.len(),
                                keys::STEP_SIZES
                            );
                            steps.set(t);
                            have_table = true;
                        }
                        Ok(_) => {
                            if failures == 1 {
                                warn!(
                                    "step sizes: none saved in {} either; closes are rounded down to 0.001 (see README, Step sizes)",
                                    keys::STEP_SIZES
                                );
                            }
                        }
                        Err(e) => warn!("step sizes: reading {} failed: {e}", keys::STEP_SIZES),
                    }
                }
                STEP_RETRY
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
