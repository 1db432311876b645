//! Unit tests of `rules`.

use super::*;

const NOW: f64 = 1_769_920_000.0;
const LIM: Limits = Limits {
    stale_threshold_s: 10.0,
    cooldown_s: 15.0,
    qty_tolerance_pct: 1.0,
    plan_max_age_s: 60.0,
};

use crate::domain::dec_str;
use std::str::FromStr;

fn plan(decision: &str, action: &str, reduce_only: bool, side: Option<&str>) -> Plan {
    Plan {
        plan_id: "abcdef0123456789".into(),
        symbol: "BTCUSDT".into(),
        kind: PlanKind::parse(decision).expect("a test plan is evaluated"),
        action: action.into(),
        reduce_only,
        side: PlanSide::parse(side),
        entry_ms: (NOW * 1000.0) as u64 - 500,
    }
}

/// The rules on raw values, as the consumer feeds them.
fn evaluate(
    plan: &Plan,
    snap: Option<&HashMap<String, String>>,
    ledger: Option<&HashMap<String, String>>,
    cooldown: Option<&str>,
    now: f64,
    lim: &Limits,
    step: Decimal,
) -> Decision {
    let inputs = Inputs::parse(
        snap.map_or(Raw::Missing, Raw::Present),
        ledger.map_or(Raw::Missing, Raw::Present),
        cooldown.map_or(Raw::Missing, Raw::Present),
    );
    super::evaluate(plan, &inputs, now, lim, step)
}
fn snap(amt: &str, age: f64) -> Option<HashMap<String, String>> {
    Some(
        [
            ("position_amt".to_string(), amt.to_string()),
            ("ts_epoch".to_string(), (NOW - age).to_string()),
            ("side".to_string(), "X".to_string()),
        ]
        .into_iter()
        .collect(),
    )
}
fn hash(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}
fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

struct Row {
    name: &'static str,
    plan: Plan,
    snap: Option<HashMap<String, String>>,
    ledger: Option<HashMap<String, String>>,
    cooldown: Option<&'static str>,
    step: &'static str,
    /// `allow:<reason>:<safe_qty>` or `deny:<reason>`.
    want: &'static str,
}

fn row(
    name: &'static str,
    plan: Plan,
    snap: Option<HashMap<String, String>>,
    want: &'static str,
) -> Row {
    Row {
        name,
        plan,
        snap,
        ledger: None,
        cooldown: None,
        step: "0.001",
        want,
    }
}

fn outcome(dec: &Decision) -> String {
    match dec {
        Decision::Allow(a) => format!("allow:{}:{}", a.reason.as_str(), dec_str(a.safe_qty)),
        Decision::Deny(d) => format!("deny:{}", d.reason.as_str()),
    }
}

#[test]
fn every_row_in_order() {
    let cooldown_recent: &'static str =
        Box::leak(format!("{}", (NOW * 1000.0) as i64 - 5_000).into_boxed_str());
    let cooldown_old: &'static str =
        Box::leak(format!("{}", (NOW * 1000.0) as i64 - 20_000).into_boxed_str());
    let mut expired = plan("EXECUTE", "FULL_CLOSE_PROPOSED", true, None);
    expired.entry_ms = ((NOW - 61.0) * 1000.0) as u64;
    let mut at_limit = plan("EXECUTE", "FULL_CLOSE_PROPOSED", true, None);
    at_limit.entry_ms = ((NOW - 60.0) * 1000.0) as u64;
    let close = || plan("EXECUTE", "FULL_CLOSE_PROPOSED", false, None);
    let mut future = close();
    future.entry_ms = ((NOW + 6.0) * 1000.0) as u64;
    let mut near_future = close();
    near_future.entry_ms = ((NOW + 4.0) * 1000.0) as u64;
    let mut far_future = close();
    far_future.entry_ms = 9_999_999_999_999;
    let big: &'static str = Box::leak("9".repeat(1 << 20).into_boxed_str());
    let with_ms = |amt: &str, ts: &str, ms: &str| {
        hash(&[("position_amt", amt), ("ts_epoch", ts), ("ts_epoch_ms", ms)])
    };
    let now_s: &'static str = Box::leak(format!("{}", NOW as i64).into_boxed_str());
    let now_ms: &'static str =
        Box::leak(format!("{}", (NOW * 1000.0) as i64 - 1500).into_boxed_str());
    let old_ms: &'static str =
        Box::leak(format!("{}", (NOW * 1000.0) as i64 - 30_000).into_boxed_str());
    let rows = vec![
        row(
            "entry ID 6 s ahead of now",
            future,
            snap("0.5", 1.0),
            "deny:plan_from_future",
        ),
        row(
            "entry ID 4 s ahead is clock skew",
            near_future,
            snap("0.5", 1.0),
            "allow:sanity_checks_passed:0.5",
        ),
        row(
            "entry ID 9999999999999 (a hostile XADD)",
            far_future,
            snap("0.5", 1.0),
            "deny:plan_from_future",
        ),
        row(
            "side=CLOSE with reduceOnly closes",
            plan("EXECUTE", "EXIT", true, Some("CLOSE")),
            snap("0.5", 1.0),
            "allow:sanity_checks_passed:0.5",
        ),
        row(
            "side=close without reduceOnly closes too",
            plan("EXECUTE", "EXIT", false, Some("close")),
            snap("-0.5", 1.0),
            "allow:sanity_checks_passed:0.5",
        ),
        row(
            "side=CLOSE while flat is no_position",
            plan("EXECUTE", "EXIT", true, Some("CLOSE")),
            snap("0", 1.0),
            "deny:no_position",
        ),
        row(
            "empty side counts as absent",
            plan("EXECUTE", "OPEN_LONG", false, Some("")),
            snap("0", 1.0),
            "allow:open_permit_granted:0",
        ),
        row(
            "position_amt 1e27",
            close(),
            snap("1e27", 1.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "position_amt Decimal::MAX",
            close(),
            snap("79228162514264337593543950335", 1.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "position_amt just above 1e12",
            close(),
            snap("1000000000000.001", 1.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "position_amt 1e12 is in bounds",
            close(),
            snap("1e12", 1.0),
            "allow:sanity_checks_passed:1000000000000",
        ),
        row(
            "position_amt of a million digits",
            close(),
            snap(big, 1.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "position_amt 1e-400 is flat",
            close(),
            snap("1e-400", 1.0),
            "deny:no_position",
        ),
        row(
            "whole-second ts_epoch with a fresh ts_epoch_ms",
            close(),
            with_ms("0.5", now_s, now_ms),
            "allow:sanity_checks_passed:0.5",
        ),
        row(
            "ts_epoch_ms wins over a fresh ts_epoch",
            close(),
            with_ms("0.5", now_s, old_ms),
            "deny:stale_exchange_state",
        ),
        row(
            "ts_epoch_ms unusable: ts_epoch applies",
            close(),
            with_ms("0.5", now_s, "NaN"),
            "allow:sanity_checks_passed:0.5",
        ),
        Row {
            ledger: hash(&[("last_known_amt", "1e27")]),
            ..row(
                "ledger 1e27",
                close(),
                snap("0.5", 1.0),
                "deny:invalid_ledger",
            )
        },
        Row {
            cooldown: Some("1e300"),
            ..row(
                "cooldown 1e300 ms",
                plan("EXECUTE", "OPEN_LONG", false, None),
                snap("0", 1.0),
                "deny:invalid_cooldown",
            )
        },
        Row {
            cooldown: Some("-5"),
            ..row(
                "negative cooldown",
                plan("EXECUTE", "OPEN_LONG", false, None),
                snap("0", 1.0),
                "deny:invalid_cooldown",
            )
        },
        Row {
            step: "0.0000000000000000000000000001",
            ..row(
                "step 1e-28 with 1e12: no overflow, no panic",
                close(),
                snap("1e12", 1.0),
                "deny:safe_qty_below_step",
            )
        },
        row(
            "expired plan",
            expired,
            snap("0.5", 1.0),
            "deny:plan_expired",
        ),
        row(
            "plan exactly at max age is judged",
            at_limit,
            snap("0.5", 1.0),
            "allow:sanity_checks_passed:0.5",
        ),
        row("no snapshot", close(), None, "deny:no_exchange_snapshot"),
        row(
            "empty snapshot hash",
            close(),
            hash(&[]),
            "deny:no_exchange_snapshot",
        ),
        row(
            "position_amt missing",
            close(),
            hash(&[("ts_epoch", "1769920000")]),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "position_amt NaN",
            close(),
            snap("NaN", 1.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "position_amt inf",
            close(),
            snap("inf", 1.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "position_amt garbage",
            close(),
            snap("abc", 1.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "ts_epoch NaN",
            close(),
            hash(&[("position_amt", "1"), ("ts_epoch", "nan")]),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "ts_epoch -inf",
            close(),
            hash(&[("position_amt", "1"), ("ts_epoch", "-inf")]),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "ts_epoch 6s in the future",
            close(),
            snap("1", -6.0),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "ts_epoch 4s in the future is skew",
            close(),
            snap("1", -4.0),
            "allow:sanity_checks_passed:1",
        ),
        row(
            "hedged snapshot",
            close(),
            hash(&[
                ("position_amt", "1"),
                ("ts_epoch", "1769920000"),
                ("side", "HEDGED"),
            ]),
            "deny:invalid_exchange_snapshot",
        ),
        row(
            "stale snapshot",
            close(),
            snap("1", 11.0),
            "deny:stale_exchange_state",
        ),
        row(
            "snapshot exactly at the threshold is fresh",
            close(),
            snap("1", 10.0),
            "allow:sanity_checks_passed:1",
        ),
        row(
            "stale snapshot on a reconcile close",
            plan("RECONCILE_CLOSE", "", false, None),
            snap("1", 30.0),
            "deny:stale_exchange_state",
        ),
        row(
            "reconcile close while flat",
            plan("RECONCILE_CLOSE", "", false, None),
            snap("0", 1.0),
            "deny:no_position",
        ),
        Row {
            cooldown: Some(cooldown_recent),
            ledger: hash(&[("last_known_amt", "-5")]),
            ..row(
                "reconcile close ignores cooldown and ledger, rounds down",
                plan("RECONCILE_CLOSE", "", false, None),
                snap("-0.0375", 1.0),
                "allow:reconcile_close_bypass:0.037",
            )
        },
        row(
            "open while flat",
            plan("EXECUTE", "OPEN_LONG", false, None),
            snap("0", 1.0),
            "allow:open_permit_granted:0",
        ),
        row(
            "open while flat (dust)",
            plan("EXECUTE", "OPEN", false, Some("BUY")),
            snap("0.00009", 1.0),
            "allow:open_permit_granted:0",
        ),
        Row {
            cooldown: Some(cooldown_recent),
            ..row(
                "cooldown denies an open",
                plan("EXECUTE", "OPEN", false, None),
                snap("0", 1.0),
                "deny:cooldown_in_flight",
            )
        },
        Row {
            cooldown: Some(cooldown_old),
            ..row(
                "expired cooldown lets an open through",
                plan("EXECUTE", "OPEN", false, None),
                snap("0", 1.0),
                "allow:open_permit_granted:0",
            )
        },
        Row {
            cooldown: Some("soon"),
            ..row(
                "unparseable cooldown denies",
                plan("EXECUTE", "OPEN", false, None),
                snap("0", 1.0),
                "deny:invalid_cooldown",
            )
        },
        row(
            "open while a position exists",
            plan("EXECUTE", "OPEN", false, None),
            snap("0.5", 1.0),
            "deny:position_exists",
        ),
        row(
            "same side while long is position_exists",
            plan("EXECUTE", "ADD", false, Some("buy")),
            snap("0.5", 1.0),
            "deny:position_exists",
        ),
        row(
            "opposite side closes a long",
            plan("EXECUTE", "EXIT", false, Some("SELL")),
            snap("0.5", 1.0),
            "allow:sanity_checks_passed:0.5",
        ),
        row(
            "opposite side closes a short",
            plan("EXECUTE", "EXIT", false, Some("Long")),
            snap("-0.5", 1.0),
            "allow:sanity_checks_passed:0.5",
        ),
        row(
            "unknown side is invalid_plan",
            plan("EXECUTE", "EXIT", false, Some("UP")),
            snap("0.5", 1.0),
            "deny:invalid_plan",
        ),
        row(
            "reduceOnly close while flat",
            plan("EXECUTE", "X", true, None),
            snap("0", 1.0),
            "deny:no_position",
        ),
        row(
            "close proposal without reduceOnly while flat",
            plan("EXECUTE", "PARTIAL_75", false, None),
            snap("0", 1.0),
            "deny:no_position",
        ),
        row(
            "action containing CLOSE closes",
            plan("EXECUTE", "EMERGENCY_CLOSE", false, None),
            snap("2", 1.0),
            "allow:sanity_checks_passed:2",
        ),
        Row {
            ledger: hash(&[("last_known_amt", "-0.5"), ("ledger_amt", "0.5")]),
            ..row(
                "side mismatch uses last_known_amt first",
                close(),
                snap("0.5", 1.0),
                "deny:reconcile_required_side_mismatch",
            )
        },
        Row {
            ledger: hash(&[("ledger_amt", "-0.5")]),
            ..row(
                "side mismatch from ledger_amt",
                close(),
                snap("0.5", 1.0),
                "deny:reconcile_required_side_mismatch",
            )
        },
        Row {
            ledger: hash(&[("last_known_amt", "0.4")]),
            ..row(
                "qty mismatch",
                close(),
                snap("0.5", 1.0),
                "deny:reconcile_required_qty_mismatch",
            )
        },
        Row {
            ledger: hash(&[("last_known_amt", "0.504")]),
            ..row(
                "qty within 1%",
                close(),
                snap("0.5", 1.0),
                "allow:sanity_checks_passed:0.5",
            )
        },
        Row {
            ledger: hash(&[("last_known_amt", "0.0109")]),
            ..row(
                "tolerance floor of 0.001 accepts",
                close(),
                snap("0.01", 1.0),
                "allow:sanity_checks_passed:0.01",
            )
        },
        Row {
            ledger: hash(&[("last_known_amt", "0.0111")]),
            ..row(
                "tolerance floor of 0.001 refuses beyond",
                close(),
                snap("0.01", 1.0),
                "deny:reconcile_required_qty_mismatch",
            )
        },
        Row {
            ledger: hash(&[("last_known_amt", "0")]),
            ..row(
                "flat ledger is no side mismatch but a qty mismatch",
                close(),
                snap("0.5", 1.0),
                "deny:reconcile_required_qty_mismatch",
            )
        },
        Row {
            ledger: hash(&[("last_order_id", "42"), ("last_order_side", "SELL")]),
            ..row(
                "ledger metadata alone is no position",
                close(),
                snap("0.5", 1.0),
                "allow:sanity_checks_passed:0.5",
            )
        },
        Row {
            ledger: hash(&[("last_known_amt", "nan")]),
            ..row(
                "invalid ledger",
                close(),
                snap("0.5", 1.0),
                "deny:invalid_ledger",
            )
        },
        Row {
            cooldown: Some(cooldown_recent),
            ..row(
                "cooldown denies a close",
                close(),
                snap("0.5", 1.0),
                "deny:cooldown_in_flight",
            )
        },
        row(
            "PARTIAL_75 of 0.038",
            plan("EXECUTE", "PARTIAL_75", false, None),
            snap("0.038", 1.0),
            "allow:sanity_checks_passed:0.028",
        ),
        row(
            "PARTIAL_75 of 0.037",
            plan("EXECUTE", "PARTIAL_75", false, None),
            snap("-0.037", 1.0),
            "allow:sanity_checks_passed:0.027",
        ),
        row(
            "PARTIAL_50 of 0.035",
            plan("EXECUTE", "PARTIAL_50", true, None),
            snap("0.035", 1.0),
            "allow:sanity_checks_passed:0.017",
        ),
        row(
            "tiny partial rounds to zero",
            plan("EXECUTE", "PARTIAL_50", true, None),
            snap("0.001", 1.0),
            "deny:safe_qty_below_step",
        ),
        Row {
            step: "1",
            ..row(
                "step 1: 1234 × 0.75 → 925",
                plan("EXECUTE", "PARTIAL_75", false, None),
                snap("1234", 1.0),
                "allow:sanity_checks_passed:925",
            )
        },
        Row {
            step: "0.1",
            ..row(
                "step 0.1: 0.35 × 0.5 → 0.1",
                plan("EXECUTE", "PARTIAL_50", false, None),
                snap("0.35", 1.0),
                "allow:sanity_checks_passed:0.1",
            )
        },
        row(
            "scientific notation position",
            close(),
            snap("5e-1", 1.0),
            "allow:sanity_checks_passed:0.5",
        ),
    ];
    for r in rows {
        let got = evaluate(
            &r.plan,
            r.snap.as_ref(),
            r.ledger.as_ref(),
            r.cooldown,
            NOW,
            &LIM,
            d(r.step),
        );
        assert_eq!(outcome(&got), r.want, "{}", r.name);
    }
}

#[test]
fn echoed_raw_values_are_cut_to_64_characters() {
    let raw = "x".repeat(1 << 20);
    let ledger = hash(&[("last_known_amt", raw.as_str())]);
    let got = evaluate(
        &plan("EXECUTE", "FULL_CLOSE_PROPOSED", false, None),
        snap("0.5", 1.0).as_ref(),
        ledger.as_ref(),
        Some(raw.as_str()),
        NOW,
        &LIM,
        d("0.001"),
    );
    let Decision::Deny(dn) = got else {
        panic!("deny expected")
    };
    let v = dn.context["value"].as_str().unwrap();
    assert_eq!(v.chars().count(), 65);
    let got = evaluate(
        &plan("EXECUTE", "OPEN_LONG", false, None),
        snap("0", 1.0).as_ref(),
        None,
        Some(raw.as_str()),
        NOW,
        &LIM,
        d("0.001"),
    );
    let Decision::Deny(dn) = got else {
        panic!("deny expected")
    };
    assert_eq!(dn.reason, Reason::InvalidCooldown);
    assert!(serde_json::Value::Object(dn.context).to_string().len() < 200);
}

#[test]
fn reduce_only_spellings() {
    for (v, want) in [
        (Some("true"), true),
        (Some("True"), true),
        (Some("1"), true),
        (Some("YES"), true),
        (Some("false"), false),
        (Some("0"), false),
        (Some("y"), false),
        (Some(""), false),
        (None, false),
    ] {
        assert_eq!(parse_reduce_only(v), want, "{v:?}");
    }
}

#[test]
fn quantities_serialize_as_clean_decimals() {
    assert_eq!(dec_json(d("0.028")).to_string(), "0.028");
    assert_eq!(dec_json(d("925")).to_string(), "925");
    assert_eq!(dec_json(d("925.000")).to_string(), "925");
    assert_eq!(dec_json(d("-0.5")).to_string(), "-0.5");
    assert_eq!(
        dec_json(floor_to_step(d("0.038") * d("0.75"), d("0.001"))).to_string(),
        "0.028"
    );
    assert_eq!(dec_str(d("0.0280")), "0.028");
}

#[test]
fn deny_contexts_carry_the_spec_fields() {
    let cd: String = format!("{}", (NOW * 1000.0) as i64 - 5_000);
    let got = evaluate(
        &plan("EXECUTE", "OPEN", false, None),
        snap("0", 1.0).as_ref(),
        None,
        Some(&cd),
        NOW,
        &LIM,
        fallback_step(),
    );
    let Decision::Deny(dn) = got else {
        panic!("cooldown must deny")
    };
    assert_eq!(
        Value::Object(dn.context).to_string(),
        format!(r#"{{"cooldown_sec":15.0,"last_exec_ts_ms":{cd},"seconds_since_exec":5.0}}"#)
    );
    let got = evaluate(
        &plan("EXECUTE", "FULL_CLOSE_PROPOSED", false, None),
        snap("0.5", 1.0).as_ref(),
        hash(&[("last_known_amt", "0.4")]).as_ref(),
        None,
        NOW,
        &LIM,
        fallback_step(),
    );
    let Decision::Deny(dn) = got else {
        panic!("qty mismatch must deny")
    };
    assert_eq!(
        Value::Object(dn.context).to_string(),
        r#"{"diff":0.1,"exchange_amt":0.5,"ledger_amt":0.4,"tolerance":0.005}"#
    );
    let got = evaluate(
        &plan("EXECUTE", "X", true, None),
        snap("0.5", 1.0).as_ref(),
        hash(&[("last_known_amt", "-0.5")]).as_ref(),
        None,
        NOW,
        &LIM,
        fallback_step(),
    );
    let Decision::Deny(dn) = got else {
        panic!("side mismatch must deny")
    };
    assert_eq!(
        Value::Object(dn.context).to_string(),
        r#"{"exchange_side":"LONG","ledger_side":"SHORT"}"#
    );
}

#[test]
fn allows_carry_amounts_and_hold_applicability() {
    let Decision::Allow(a) = evaluate(
        &plan("EXECUTE", "PARTIAL_50", false, None),
        snap("-2", 1.0).as_ref(),
        hash(&[("last_known_amt", "-2")]).as_ref(),
        None,
        NOW,
        &LIM,
        fallback_step(),
    ) else {
        panic!("allow expected")
    };
    assert_eq!(
        (
            dec_str(a.exchange_amt),
            dec_str(a.ledger_amt),
            dec_str(a.safe_qty),
            a.hold_applies
        ),
        ("-2".into(), "-2".into(), "1".into(), true)
    );
    let Decision::Allow(a) = evaluate(
        &plan("RECONCILE_CLOSE", "", false, None),
        snap("2", 1.0).as_ref(),
        None,
        None,
        NOW,
        &LIM,
        fallback_step(),
    ) else {
        panic!("allow expected")
    };
    assert!(!a.hold_applies, "reconcile close bypasses the hold");
}
