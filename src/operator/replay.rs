//! `position-state-brain replay` (SPEC §14): what would a configuration
//! change have done to recorded decisions?
//!
//! It reads records from `quantum:stream:p33.decisions` (`--last N` or
//! `--since DURATION`), turns each evaluated one back into the plan and the
//! typed inputs the rules read, and decides again with the same pure
//! [`rules::evaluate`] the daemon runs, under the current configuration
//! changed by each `--set`. The guards of the write are judged on what the
//! record says they read: the trading state and the hold as recorded, the
//! limits of §13 on the recorded counters (a limit that was off when the
//! plan was recorded has no counter, and denies nothing). It writes nothing.

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::config::Config;
use crate::domain::{dec_str, parse_amount, parse_dec};
use crate::gate::rules::{
    self, CooldownInput, Decision, Inputs, LedgerInput, Limits, Plan, PlanKind, PlanSide, Snapshot,
    SnapshotInput,
};
use crate::redis::keys;
use crate::redis::store;
use crate::redis::stream::{Entry, RangeCursor};

/// `replay`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The newest N records (default 10,000).
    #[arg(long, conflicts_with = "since")]
    pub last: Option<usize>,
    /// Records of the last DURATION (`90s`, `15m`, `2h`, `1d`).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// A variable to change for the replay, VAR=VALUE (repeatable).
    #[arg(long = "set", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Replay a dry run's records (`quantum:stream:p33.decisions.dry_run`).
    #[arg(long)]
    pub dry_run: bool,
    /// The baseline is this running instance's settings (default: the
    /// newest running instance's).
    #[arg(long, conflicts_with = "from_env")]
    pub instance: Option<String>,
    /// The baseline is this shell's environment, not a running instance's
    /// settings.
    #[arg(long)]
    pub from_env: bool,
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not VAR=VALUE")),
    }
}

/// `90s`, `15m`, `2h`, `1d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mult = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86400.0,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 15m"))?;
    let secs = n * mult;
    if !secs.is_finite() || secs <= 0.0 || secs > 366.0 * 86400.0 {
        return Err(format!("{s:?} is not a duration between 0 and a year"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// One recorded decision, as the rules and the guards saw it.
#[derive(Debug, Clone)]
pub struct Case {
    /// The plan.
    pub plan: Plan,
    /// The rules' inputs.
    pub inputs: Inputs,
    /// The step used.
    pub step: Decimal,
    /// `now` of the decision.
    pub now: f64,
    /// What the write's guards read (`Null` when none ran).
    pub guards: Value,
    /// The recorded outcome: allow or deny.
    pub allowed: bool,
    /// The recorded (final) reason.
    pub reason: String,
    /// The recorded safe quantity ("" for a deny).
    pub safe_qty: String,
}

fn field_name(f: &str) -> &'static str {
    match f {
        "position_amt" => "position_amt",
        "ts_epoch" => "ts_epoch",
        "side" => "side",
        "type" => "type",
        "last_known_amt" => "last_known_amt",
        "ledger_amt" => "ledger_amt",
        _ => "unknown",
    }
}

/// A record back into a [`Case`]; `None` for records that were not
/// evaluated (filtered, duplicates) or that cannot be read.
pub fn case_of(e: &Entry) -> Option<Case> {
    let f = e.fields.as_ref()?;
    let allowed = match f.get("outcome")?.as_str() {
        "allow" | "dry_run_allow" => true,
        "deny" | "dry_run_deny" => false,
        _ => return None,
    };
    let plan_v: Value = serde_json::from_str(f.get("plan")?).ok()?;
    let inputs_v: Value = serde_json::from_str(f.get("inputs")?).ok()?;
    let plan = Plan {
        plan_id: f.get("plan_id")?.clone(),
        symbol: f.get("symbol")?.clone(),
        kind: PlanKind::parse(plan_v["decision"].as_str()?)?,
        action: plan_v["action"].as_str()?.to_string(),
        reduce_only: plan_v["reduce_only"].as_bool()?,
        side: match plan_v["side"].as_str()? {
            "BUY" => PlanSide::Buy,
            "SELL" => PlanSide::Sell,
            "CLOSE" => PlanSide::Close,
            "INVALID" => PlanSide::Invalid,
            _ => PlanSide::Absent,
        },
        entry_ms: plan_v["entry_ms"].as_u64()?,
    };
    let s = &inputs_v["snapshot"];
    let snapshot = if s.get("missing").is_some() {
        SnapshotInput::Missing
    } else if let Some(field) = s.get("invalid").and_then(Value::as_str) {
        SnapshotInput::Invalid {
            field: field_name(field),
        }
    } else {
        SnapshotInput::Valid(Snapshot {
            amt: parse_amount(s["amt"].as_str()?)?,
            ts: s["ts"].as_f64()?,
            hedged: s["hedged"].as_bool()?,
        })
    };
    let l = &inputs_v["ledger"];
    let ledger = if l.is_null() {
        LedgerInput::Absent
    } else if let Some(field) = l.get("invalid").and_then(Value::as_str) {
        LedgerInput::Invalid {
            field: field_name(field),
            value: l["value"].as_str().unwrap_or("").to_string(),
        }
    } else {
        LedgerInput::Amount(parse_amount(l["amt"].as_str()?)?)
    };
    let c = &inputs_v["cooldown"];
    let cooldown = if c.is_null() {
        CooldownInput::Absent
    } else if let Some(v) = c.get("invalid").and_then(Value::as_str) {
        CooldownInput::Invalid {
            value: v.to_string(),
        }
    } else {
        CooldownInput::At(c["ms"].as_f64()?)
    };
    Some(Case {
        plan,
        inputs: Inputs {
            snapshot,
            ledger,
            cooldown,
        },
        step: parse_dec(inputs_v["step"].as_str()?)?,
        now: inputs_v["now"].as_f64()?,
        guards: inputs_v.get("guards").cloned().unwrap_or(Value::Null),
        allowed,
        reason: f.get("reason")?.clone(),
        safe_qty: f.get("safe_qty").cloned().unwrap_or_default(),
    })
}

/// What a decision comes to: allowed or not, the reason, the quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Allowed.
    pub allowed: bool,
    /// The final reason.
    pub reason: String,
    /// The safe quantity ("" for a deny).
    pub safe_qty: String,
}

/// Decides a case again under `cfg`: the pure rules, then the write's
/// guards on what they recorded (in the write script's order).
pub fn decide(case: &Case, cfg: &Config) -> Outcome {
    let lim = Limits {
        stale_threshold_s: cfg.stale_threshold_s,
        cooldown_s: cfg.cooldown_s,
        qty_tolerance_pct: cfg.qty_tolerance_pct,
        plan_max_age_s: cfg.plan_max_age_s,
    };
    let deny = |reason: &str| Outcome {
        allowed: false,
        reason: reason.to_string(),
        safe_qty: String::new(),
    };
    // No gate had armed Redis (SPEC §12): every evaluated plan was denied.
    if case.guards["armed"] == false {
        return deny("trading_state_unknown");
    }
    let a = match rules::evaluate(&case.plan, &case.inputs, case.now, &lim, case.step) {
        Decision::Deny(d) => return deny(d.reason.as_str()),
        Decision::Allow(a) => a,
    };
    let g = &case.guards;
    let open = a.reason == rules::AllowReason::OpenPermitGranted;
    let reconcile = a.reason == rules::AllowReason::ReconcileCloseBypass;
    match g["state"].as_str().unwrap_or("ACTIVE") {
        "HALTED" => return deny("trading_halted"),
        "REDUCING" if open => return deny("trading_reducing"),
        _ => {}
    }
    if !reconcile && g["hold"] == true {
        return deny("reconcile_hold_active");
    }
    if open && g["broken"].is_string() {
        return deny("invalid_guard_state");
    }
    if open {
        let count = |k: &str| g[k].as_u64();
        if let (Some(r), Some(c)) = (cfg.max_opens, count("opens_global")) {
            if c >= u64::from(r.limit) {
                return deny("throttled");
            }
        }
        if let (Some(r), Some(c)) = (cfg.max_opens_per_symbol, count("opens_symbol")) {
            if c >= u64::from(r.limit) {
                return deny("throttled");
            }
        }
        if let (Some(cap), Some(p), Some(f)) = (
            cfg.max_open_positions,
            count("positions"),
            count("in_flight"),
        ) {
            if p + f >= u64::from(cap) {
                return deny("max_open_positions");
            }
        }
    }
    Outcome {
        allowed: true,
        reason: a.reason.as_str().to_string(),
        safe_qty: dec_str(a.safe_qty),
    }
}

/// The five kinds of change, in report order.
pub const KINDS: [&str; 5] = [
    "unchanged",
    "allow_to_deny",
    "deny_to_allow",
    "reason_changed",
    "quantity_changed",
];

/// How a replayed outcome compares to the recorded one.
pub fn kind_of(before: &Outcome, after: &Outcome) -> &'static str {
    match (before.allowed, after.allowed) {
        (true, false) => "allow_to_deny",
        (false, true) => "deny_to_allow",
        _ if before.reason != after.reason => "reason_changed",
        _ if before.safe_qty != after.safe_qty => "quantity_changed",
        _ => "unchanged",
    }
}

/// The replay's counts and up to 10 examples of each change.
#[derive(Debug, Default)]
pub struct Report {
    /// Records read.
    pub records: usize,
    /// Records replayed (evaluated allows and denies).
    pub replayed: usize,
    /// Per kind: the count and up to 10 examples.
    pub kinds: Vec<(&'static str, usize, Vec<String>)>,
}

/// Replays `entries` under `cfg`.
pub fn replay(
    entries: &[Entry],
    cfg: &Config,
    progress: Option<&indicatif::ProgressBar>,
) -> Report {
    let mut r = Report {
        records: entries.len(),
        kinds: KINDS.iter().map(|k| (*k, 0, Vec::new())).collect(),
        ..Report::default()
    };
    for e in entries {
        if let Some(p) = progress {
            p.inc(1);
        }
        let Some(case) = case_of(e) else { continue };
        r.replayed += 1;
        let before = Outcome {
            allowed: case.allowed,
            reason: case.reason.clone(),
            safe_qty: case.safe_qty.clone(),
        };
        let after = decide(&case, cfg);
        let kind = kind_of(&before, &after);
        if let Some(slot) = r.kinds.iter_mut().find(|(k, _, _)| *k == kind) {
            slot.1 += 1;
            if kind != "unchanged" && slot.2.len() < 10 {
                // What a record holds is cut and escaped (SPEC §14).
                let c = |v: &str| crate::text::clip(v).into_owned();
                let show = |o: &Outcome| {
                    if o.allowed {
                        format!("allow {} qty {}", c(&o.reason), c(&o.safe_qty))
                    } else {
                        format!("deny {}", c(&o.reason))
                    }
                };
                slot.2.push(format!(
                    "{} {}: {} -> {}",
                    c(&case.plan.plan_id),
                    c(&case.plan.symbol),
                    show(&before),
                    show(&after)
                ));
            }
        }
    }
    r
}

/// Reads the records `args` asks for, oldest first.
async fn read(
    con: &mut crate::redis::store::Conn,
    args: &ReplayArgs,
) -> Result<Vec<Entry>, redis::RedisError> {
    let mut out = Vec::new();
    if let Some(d) = args.since {
        let from = store::now_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(0));
        let mut pages = RangeCursor::oldest_first(keys::decisions(args.dry_run), from.to_string());
        loop {
            let page = pages.next_page(con, 1000).await?;
            if page.is_empty() {
                break;
            }
            out.extend(page);
        }
        return Ok(out);
    }
    let want = args.last.unwrap_or(10_000);
    let mut pages = RangeCursor::newest_first(keys::decisions(args.dry_run));
    while out.len() < want {
        let page = pages.next_page(con, (want - out.len()).min(1000)).await?;
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    out.reverse();
    Ok(out)
}

/// The variables a replay judges with ([`decide`]: the rules' limits and
/// the automatic limits): the only ones `--set` may change.
pub const REPLAYABLE: [&str; 7] = [
    "P33_STALE_THRESHOLD_SEC",
    "P33_COOLDOWN_SEC",
    "P33_QTY_TOLERANCE_PCT",
    "P33_PLAN_MAX_AGE_S",
    "P33_MAX_OPENS",
    "P33_MAX_OPENS_PER_SYMBOL",
    "P33_MAX_OPEN_POSITIONS",
];

/// The baseline among running instances' reports: `name`'s, or else the
/// newest started one in the mode replayed (live, or dry run); its name
/// and settings.
fn baseline_of(
    reports: &[(String, std::collections::HashMap<String, String>)],
    name: Option<&str>,
    dry_run: bool,
) -> Option<(String, Vec<(String, String)>)> {
    let mode = if dry_run { "dry_run" } else { "live" };
    reports
        .iter()
        .filter(|(n, f)| match name {
            Some(want) => n == want,
            None => f.get("mode").map(String::as_str) == Some(mode),
        })
        .filter_map(|(n, f)| {
            let pairs = crate::gate::record::parse_settings(f.get("settings")?)?;
            let started: u64 = f.get("started_at")?.parse().ok()?;
            Some((started, n.clone(), pairs))
        })
        .max_by_key(|(started, n, _)| (*started, n.clone()))
        .map(|(_, n, pairs)| (crate::text::clip(&n).into_owned(), pairs))
}

/// Runs `replay`; returns the exit code. The configuration is the
/// environment's; each `--set` changes it. A `--set` of a name the replay
/// does not judge with (a typo must never read as "no impact"), or of a bad
/// value, exits 78 naming it.
pub async fn run(args: ReplayArgs) -> i32 {
    if let Some((name, _)) = args
        .set
        .iter()
        .find(|(k, _)| !REPLAYABLE.contains(&k.as_str()))
    {
        eprintln!(
            "invalid configuration: --set {}: not a variable the rules or limits read; replay can change {}",
            crate::text::clip(name),
            REPLAYABLE.join(", ")
        );
        return crate::config::EXIT_CONFIG;
    }
    // The Redis settings come from the environment (SPEC §12).
    let env_cfg = match Config::tools_from_env_with(args.set.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return crate::config::EXIT_CONFIG;
        }
    };
    let mut con = match store::Redis::new(env_cfg.redis.clone())
        .connect_once(Duration::from_secs(5))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "replay: cannot reach Redis at {}: {e}",
                env_cfg.redis.display()
            );
            return 1;
        }
    };
    // The baseline: a running instance's settings, not the shell's (SPEC
    // §14), unless --from-env; each --set changes it.
    let (who, base_pairs) = if args.from_env {
        (
            "this shell's environment (--from-env)".to_string(),
            Vec::new(),
        )
    } else {
        let reports = match crate::operator::instance::read_all(&mut con).await {
            Ok(r) => r.ok,
            Err(e) => {
                eprintln!("replay: Redis error: {e}");
                return 1;
            }
        };
        match baseline_of(&reports, args.instance.as_deref(), args.dry_run) {
            Some((name, pairs)) => (format!("the settings of instance {name}"), pairs),
            None if args.instance.is_some() => {
                eprintln!(
                    "replay: no running instance {} reports its settings (ctl status lists them)",
                    crate::text::clip(args.instance.as_deref().unwrap_or(""))
                );
                return 1;
            }
            None => (
                "this shell's environment (no running instance reports its settings)".to_string(),
                Vec::new(),
            ),
        }
    };
    let base_hash = match Config::tools_from_env_with(base_pairs.clone()) {
        Ok(c) => crate::gate::record::config_hash(&c),
        Err(e) => {
            eprintln!("replay: the baseline's settings do not parse: {e}");
            return crate::config::EXIT_CONFIG;
        }
    };
    let mut pairs = base_pairs;
    pairs.extend(args.set.clone());
    let cfg = match Config::tools_from_env_with(pairs) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return crate::config::EXIT_CONFIG;
        }
    };
    let entries = match read(&mut con, &args).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("replay: Redis error: {e}");
            return 1;
        }
    };
    let progress = (entries.len() > 5000).then(|| {
        let p = indicatif::ProgressBar::new(entries.len() as u64);
        p.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        p
    });
    let report = replay(&entries, &cfg, progress.as_ref());
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let sets: Vec<String> = args.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
    // Records decided under another configuration than the baseline's.
    let other = entries
        .iter()
        .filter(|e| {
            e.fields
                .as_ref()
                .and_then(|f| f.get("config"))
                .is_some_and(|c| *c != base_hash)
        })
        .count();
    if args.json {
        let kinds: serde_json::Map<String, Value> = report
            .kinds
            .iter()
            .map(|(k, n, ex)| (k.to_string(), json!({"count": n, "examples": ex})))
            .collect();
        println!(
            "{}",
            json!({"records": report.records, "replayed": report.replayed, "set": sets, "changes": kinds,
                "baseline": who, "baseline_config": base_hash, "other_config": other})
        );
    } else {
        println!("baseline: {who} (config {base_hash})");
        if other > 0 {
            println!(
                "{other} of {} records were decided under another configuration than the baseline's (their config hash is not {base_hash})",
                entries.len()
            );
        }
        println!(
            "replayed {} decisions of {} records under {}",
            report.replayed,
            report.records,
            if sets.is_empty() {
                "the baseline".to_string()
            } else {
                sets.join(" ")
            }
        );
        for (k, n, ex) in &report.kinds {
            println!("  {:<17} {n}", k.replace('_', " "));
            for e in ex {
                println!("      {e}");
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        for bad in ["", "x", "5y", "-1h", "0s", "1e300s", "400d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds_of_change() {
        let o = |allowed, reason: &str, q: &str| Outcome {
            allowed,
            reason: reason.into(),
            safe_qty: q.into(),
        };
        let allow = o(true, "sanity_checks_passed", "0.5");
        assert_eq!(kind_of(&allow, &allow.clone()), "unchanged");
        assert_eq!(
            kind_of(&allow, &o(false, "no_position", "")),
            "allow_to_deny"
        );
        assert_eq!(
            kind_of(&o(false, "no_position", ""), &allow),
            "deny_to_allow"
        );
        assert_eq!(
            kind_of(&o(false, "a", ""), &o(false, "b", "")),
            "reason_changed"
        );
        assert_eq!(
            kind_of(&allow, &o(true, "sanity_checks_passed", "0.4")),
            "quantity_changed"
        );
    }
}
