//! Property tests (issue 9): arbitrary strings and byte values into every
//! parser and into the rules. Nothing may panic — a panic on input replays
//! on every restart and turns the gate into a crash loop — and anything
//! invalid must come out as a deny or a clear error, never an allow.
//!
//! `ops/test.sh` runs a few thousand cases of each (`PROPTEST_CASES`).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use position_state_brain::allowlist::{self, Allowlist, Doc, Source, UniverseRead};
use position_state_brain::config::{AllowlistMode, Config};
use position_state_brain::domain;
use position_state_brain::exchange::{self, parse_positions, parse_step_sizes, retry_after};
use position_state_brain::gate::consumer::classify;
use position_state_brain::gate::ledger::{interpret, ResultAction};
use position_state_brain::gate::rules::{
    self, evaluate, Decision, Inputs, Limits, Plan, PlanKind, PlanSide, Raw,
};
use position_state_brain::redis::stream::parse_xread;
use proptest::prelude::*;
use redis::Value;
use rust_decimal::Decimal;
use serde_json::json;

const NOW: f64 = 1_769_920_000.0;
const LIM: Limits = Limits {
    stale_threshold_s: 10.0,
    cooldown_s: 15.0,
    qty_tolerance_pct: 1.0,
    plan_max_age_s: 60.0,
};

/// Strings that look like numbers, including the hostile ones: huge and tiny
/// exponents, many digits, NaN and infinities, signs, blanks.
fn numberish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[-+]?[0-9]{0,40}(\\.[0-9]{0,40})?([eE][-+]?[0-9]{1,6})?",
        Just("NaN".to_string()),
        Just("-inf".to_string()),
        Just("inf".to_string()),
        Just("79228162514264337593543950335".to_string()),
        Just("-79228162514264337593543950335".to_string()),
        Just("1e27".to_string()),
        Just("1e-28".to_string()),
        Just("18446744073709551615".to_string()),
        " ?[0-9]{1,3}\\.[0-9]{1,3} ?",
        ".{0,12}",
    ]
}

/// Any string: numbers, words, unicode, controls.
fn anything() -> impl Strategy<Value = String> {
    prop_oneof![numberish(), "\\PC{0,40}", ".{0,80}"]
}

fn opt(s: impl Strategy<Value = String>) -> impl Strategy<Value = Option<String>> {
    proptest::option::of(s)
}

/// An arbitrary JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        anything().prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::hash_map("[a-zA-Z_]{1,16}", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn hash(pairs: Vec<(&str, Option<String>)>) -> HashMap<String, String> {
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect()
}

proptest! {
    #[test]
    fn parse_dec_never_panics(s in anything()) {
        if let Some(d) = domain::parse_dec(&s) {
            let f: f64 = s.trim().parse().expect("a parsed decimal was a float first");
            prop_assert!(f.is_finite());
            prop_assert!(d.abs() <= Decimal::MAX);
        }
        if let Some(a) = domain::parse_amount(&s) {
            prop_assert!(a.abs() <= domain::max_amount());
        }
    }

    #[test]
    fn the_rules_never_panic_and_allow_only_what_is_sound(
        amt in opt(numberish()),
        ts in opt(numberish()),
        ts_ms in opt(numberish()),
        snap_side in opt(anything()),
        ledger in opt(numberish()),
        ledger_amt in opt(numberish()),
        cooldown in opt(numberish()),
        action in anything(),
        side in opt(anything()),
        reduce_only in any::<bool>(),
        reconcile in any::<bool>(),
        entry_ms in any::<u64>(),
        step in numberish(),
        snapshot_present in any::<bool>(),
    ) {
        let plan = Plan {
            plan_id: "p".into(),
            symbol: "BTCUSDT".into(),
            kind: if reconcile { PlanKind::ReconcileClose } else { PlanKind::Execute },
            action,
            reduce_only,
            side: PlanSide::parse(side.as_deref()),
            entry_ms,
        };
        let snap = hash(vec![
            ("position_amt", amt.clone()),
            ("ts_epoch", ts),
            ("ts_epoch_ms", ts_ms),
            ("side", snap_side),
        ]);
        let led = hash(vec![("last_known_amt", ledger), ("ledger_amt", ledger_amt)]);
        let step = domain::parse_dec(&step)
            .filter(|s| domain::valid_step(*s))
            .unwrap_or_else(domain::fallback_step);
        let inputs = Inputs::parse(
            if snapshot_present { Raw::Present(&snap) } else { Raw::Missing },
            Raw::Present(&led),
            cooldown.as_deref().map_or(Raw::Missing, Raw::Present),
        );
        let got = evaluate(&plan, &inputs, NOW, &LIM, step);
        if let Decision::Allow(a) = got {
            // An allow needs a real, bounded amount and a fresh snapshot.
            let ex = amt.as_deref().and_then(domain::parse_amount);
            prop_assert!(snapshot_present && ex.is_some(), "allowed without a valid amount");
            let ex = ex.unwrap_or_default();
            prop_assert!(a.safe_qty >= Decimal::ZERO);
            prop_assert!(a.safe_qty <= ex.abs(), "safe {} > |ex| {}", a.safe_qty, ex);
            let age = NOW - entry_ms as f64 / 1000.0;
            prop_assert!(age <= LIM.plan_max_age_s && -age <= rules::MAX_FUTURE_SKEW_S);
            if !a.safe_qty.is_zero() {
                prop_assert!((a.safe_qty / step).fract().is_zero(), "whole steps");
            }
        }
    }

    #[test]
    fn plan_entries_of_arbitrary_bytes_classify_without_panic(
        id in "[0-9]{0,20}(-[0-9]{0,20})?|.{0,8}",
        fields in prop::collection::vec(
            (
                prop_oneof![
                    Just(b"plan_id".to_vec()),
                    Just(b"symbol".to_vec()),
                    Just(b"decision".to_vec()),
                    Just(b"side".to_vec()),
                    Just(b"reduceOnly".to_vec()),
                    prop::collection::vec(any::<u8>(), 0..12),
                ],
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..40),
                    Just(b"EXECUTE".to_vec()),
                    Just(b"BTCUSDT".to_vec()),
                    Just(b"bad\xffid".to_vec()),
                    anything().prop_map(String::into_bytes),
                ],
            ),
            0..10,
        ),
    ) {
        let mut kv = Vec::new();
        for (k, v) in &fields {
            kv.push(Value::BulkString(k.clone()));
            kv.push(Value::BulkString(v.clone()));
        }
        let reply = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"quantum:stream:apply.plan".to_vec()),
            Value::Array(vec![Value::Array(vec![
                Value::BulkString(id.clone().into_bytes()),
                Value::Array(kv),
            ])]),
        ])]);
        let allow = Allowlist {
            source: Source::Env,
            symbols: HashSet::from(["BTCUSDT".to_string()]),
            expires_at: None,
        };
        for e in parse_xread(&reply) {
            if let Ok(plan) = classify(&e, &allow, NOW) {
                // Only a valid, UTF-8, allowlisted plan is evaluated.
                prop_assert!(e.not_utf8.is_none());
                prop_assert!(plan.plan_id.len() <= 128 && !plan.plan_id.is_empty());
                prop_assert_eq!(plan.symbol, "BTCUSDT");
            }
        }
    }

    #[test]
    fn universe_documents_and_meta_never_panic(
        doc in prop_oneof![
            json_value().prop_map(|v| v.to_string()),
            anything(),
            (prop::collection::vec(anything(), 0..20), numberish())
                .prop_map(|(s, a)| json!({"symbols": s, "asof_epoch": a}).to_string()),
        ],
        stale in opt(numberish()),
        count in opt(numberish()),
        asof in opt(numberish()),
        last_ok in opt(anything()),
        env in prop::collection::vec(anything(), 0..4),
    ) {
        let read = UniverseRead {
            active: Doc::Text(doc),
            meta: hash(vec![("stale", stale), ("count", count), ("asof_epoch", asof)]),
            last_ok: last_ok.map_or(Doc::Missing, Doc::Text),
        };
        let lim = allowlist::Limits { max_age_s: 300.0 };
        let r = allowlist::resolve(Ok(&read), &env, AllowlistMode::Universe, NOW, &lim);
        for s in &r.symbols {
            prop_assert!(allowlist::valid_symbol(s));
        }
        if let Some(e) = r.expires_at {
            prop_assert!(e.is_finite(), "expiry {e}");
        }
        if r.source == Source::None {
            prop_assert!(r.symbols.is_empty());
        }
        prop_assert!(r.log_line().len() < 400);
    }

    #[test]
    fn position_risk_bodies_never_panic(
        body in prop_oneof![
            json_value(),
            prop::collection::vec(
                (
                    prop_oneof![Just("BTCUSDT".to_string()), Just("ETHUSDT".to_string()), anything()],
                    numberish(),
                    prop_oneof![Just("BOTH"), Just("LONG"), Just("SHORT"), Just("??")],
                ),
                0..8,
            )
            .prop_map(|rows| json!(rows
                .into_iter()
                .map(|(s, a, side)| json!({"symbol": s, "positionAmt": a, "positionSide": side}))
                .collect::<Vec<_>>())),
        ],
    ) {
        if let Ok(p) = parse_positions(&body) {
            for pos in p.values() {
                prop_assert!(pos.amt.abs() <= domain::max_amount() * Decimal::from(2));
                prop_assert!(["LONG", "SHORT", "NONE", "HEDGED"].contains(&pos.side.as_str()));
            }
        }
    }

    #[test]
    fn user_stream_frames_never_panic_and_apply_whole_or_not_at_all(
        text in prop_oneof![
            anything(),
            json_value().prop_map(|v| v.to_string()),
            (
                any::<u64>(),
                any::<u64>(),
                prop::collection::vec(
                    (
                        prop_oneof![Just("BTCUSDT".to_string()), Just("ETHUSDT".to_string()), anything()],
                        numberish(),
                        prop_oneof![Just("BOTH"), Just("LONG"), Just("SHORT"), Just("??")],
                    ),
                    0..6,
                ),
            )
                .prop_map(|(e, t, legs)| json!({
                    "e": "ACCOUNT_UPDATE", "E": e, "T": t,
                    "a": {"m": "ORDER", "P": legs.into_iter().map(|(s, a, ps)| json!({"s": s, "pa": a, "ps": ps})).collect::<Vec<_>>()}
                }).to_string()),
        ],
    ) {
        let mut book = exchange::Book::default();
        if let exchange::Frame::Account(ev) = exchange::parse_frame(&text, u64::MAX) {
            let allowed: std::collections::HashSet<String> =
                ev.legs.iter().map(|l| l.symbol.clone()).collect();
            let clock = exchange::Clock { local_ms: 1, exchange_ms: u64::MAX };
            let applied = book.apply_event(&ev, clock, &allowed, 1);
            // Only the frame's symbols change, and no entry is counted
            // twice: each one applied or was stale.
            prop_assert!(applied.stale <= ev.legs.len());
            prop_assert!(applied.symbols.iter().all(|s| ev.legs.iter().any(|l| &l.symbol == s)));
            for l in &ev.legs {
                prop_assert!(l.amt.abs() <= domain::max_amount());
                prop_assert!(book.position(&l.symbol).amt.abs() <= domain::max_amount() * Decimal::from(2));
            }
        }
    }

    #[test]
    fn exchange_info_bodies_never_panic(
        body in prop_oneof![
            json_value(),
            prop::collection::vec((anything(), numberish()), 0..8).prop_map(|rows| json!({
                "symbols": rows.into_iter().map(|(s, step)| json!({
                    "symbol": s,
                    "filters": [{"filterType": "MARKET_LOT_SIZE", "stepSize": step}]
                })).collect::<Vec<_>>()
            })),
        ],
    ) {
        if let Ok(t) = parse_step_sizes(&body) {
            for step in t.values() {
                prop_assert!(domain::valid_step(*step), "step {step}");
            }
        }
    }

    #[test]
    fn retry_after_headers_never_panic(h in opt(anything())) {
        let d = retry_after(h.as_deref());
        prop_assert!(d.as_secs() <= 300);
        prop_assert!(std::time::Instant::now().checked_add(d).is_some());
    }

    #[test]
    fn apply_results_never_panic(
        executed in opt(prop_oneof![Just("true".to_string()), Just("True".to_string()), anything()]),
        symbol in opt(prop_oneof![Just("BTCUSDT".to_string()), anything()]),
        steps in opt(prop_oneof![json_value().prop_map(|v| v.to_string()), anything()]),
        details in opt(prop_oneof![
            json_value().prop_map(|v| v.to_string()),
            (anything(), anything(), anything(), anything()).prop_map(|(o, q, s, st)| json!({
                "order_id": o, "filled_qty": q, "side": s, "order_status": st
            }).to_string()),
        ]),
    ) {
        let fields = hash(vec![
            ("executed", executed),
            ("symbol", symbol),
            ("steps_results", steps),
            ("details", details),
        ]);
        if let ResultAction::Apply(m) = interpret(&fields) {
            prop_assert!(allowlist::valid_symbol(&m.symbol));
            prop_assert!(m.order_side == "BUY" || m.order_side == "SELL");
            prop_assert!(m.order_id.chars().count() <= 65);
            prop_assert!(m.executed_qty.chars().count() <= 65);
        }
    }

    #[test]
    fn configuration_values_never_panic_nor_leak_the_password(
        url in opt(prop_oneof![anything(), "[a-z]{0,6}:?/{0,2}:?hunter2@[a-z0-9.:]{0,20}"]),
        values in prop::collection::vec(
            prop_oneof![anything(), "[0-9]e[0-9]{2,3}", Just("1e300".to_string())],
            8,
        ),
    ) {
        let names = [
            "P33_POLL_SEC", "P33_PERMIT_TTL", "P33_QTY_TOLERANCE_PCT", "P33_METRICS_PORT",
            "P33_ALLOWLIST", "P33_DRY_RUN", "P33_CLAIM_IDLE_S", "P33_UNIVERSE_MAX_AGE_S",
        ];
        let mut vars: Vec<(String, String)> = names
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        vars.push(("P33_SNAPSHOT_SOURCE".into(), "external".into()));
        vars.push(("REDIS_PASSWORD".into(), "hunter2".into()));
        if let Some(u) = url {
            vars.push(("REDIS_URL".into(), u));
        }
        match Config::from_pairs(vars) {
            Ok(c) => {
                let shown = format!("{:?}", c);
                prop_assert!(!shown.contains("hunter2"));
            }
            Err(e) => prop_assert!(!e.to_string().contains("hunter2"), "{e}"),
        }
    }
}

#[test]
fn decimal_max_step_and_amount_are_in_the_strategies() {
    // The strategies above reach the values that crashed the daemon.
    assert!(domain::parse_amount("79228162514264337593543950335").is_none());
    assert!(!domain::valid_step(
        Decimal::from_str("0.0000000000000000000000000001").unwrap()
    ));
}
