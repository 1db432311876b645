//! Unit tests of `consumer`.

use super::*;
use std::collections::HashSet;

fn entry(id: &str, f: &[(&str, &str)]) -> Entry {
    Entry {
        id: id.into(),
        fields: Some(
            f.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        not_utf8: None,
    }
}

#[test]
fn classify_filters_in_spec_order() {
    let allow = Allowlist {
        source: crate::allowlist::Source::Env,
        symbols: HashSet::from(["BTCUSDT".to_string()]),
        expires_at: None,
    };
    let ok = [
        ("plan_id", "p1"),
        ("symbol", "BTCUSDT"),
        ("decision", "EXECUTE"),
        ("action", "OPEN"),
        ("reduceOnly", "Yes"),
    ];
    let p = classify(&entry("1700000000000-0", &ok), &allow, 0.0).unwrap();
    assert!(p.reduce_only);
    assert_eq!(p.entry_ms, 1_700_000_000_000);
    let long = "x".repeat(129);
    for (name, f, want) in [
        (
            "missing plan_id",
            vec![("symbol", "BTCUSDT"), ("decision", "EXECUTE")],
            "malformed",
        ),
        (
            "empty plan_id",
            vec![("plan_id", ""), ("decision", "EXECUTE")],
            "malformed",
        ),
        (
            "plan_id with space",
            vec![("plan_id", "a b"), ("decision", "EXECUTE")],
            "malformed",
        ),
        (
            "plan_id with control",
            vec![("plan_id", "a\u{7}"), ("decision", "EXECUTE")],
            "malformed",
        ),
        (
            "plan_id too long",
            vec![("plan_id", long.as_str()), ("decision", "EXECUTE")],
            "malformed",
        ),
        (
            "skip decision",
            vec![
                ("plan_id", "p"),
                ("symbol", "BTCUSDT"),
                ("decision", "SKIP"),
            ],
            "skip",
        ),
        (
            "missing decision",
            vec![("plan_id", "p"), ("symbol", "BTCUSDT")],
            "skip",
        ),
        (
            "not allowlisted",
            vec![
                ("plan_id", "p"),
                ("symbol", "ETHUSDT"),
                ("decision", "EXECUTE"),
            ],
            "not",
        ),
        (
            "missing symbol is UNKNOWN",
            vec![("plan_id", "p"), ("decision", "RECONCILE_CLOSE")],
            "not",
        ),
    ] {
        let got = match classify(&entry("1-0", &f), &allow, 0.0) {
            Err(Filtered::Malformed(_)) => "malformed",
            Err(Filtered::SkipDecision) => "skip",
            Err(Filtered::NotAllowlisted) => "not",
            Ok(_) => "evaluate",
        };
        assert_eq!(got, want, "{name}");
    }
    let deleted = Entry {
        id: "1-0".into(),
        fields: None,
        not_utf8: None,
    };
    assert!(matches!(
        classify(&deleted, &allow, 0.0),
        Err(Filtered::Malformed(_))
    ));
    let p128 = "y".repeat(128);
    assert!(valid_plan_id(&p128));
}

#[test]
fn the_summary_counts_each_outcome_of_the_last_period() {
    let m = Metrics::new();
    m.plans_total.with_label_values(&["allow"]).inc_by(7);
    let mut s = Summary::new(&m);
    let t0 = std::time::Instant::now();
    assert_eq!(s.tick(&m, t0), None, "not before a period has passed");
    m.plans_total.with_label_values(&["allow"]).inc_by(3);
    m.plans_total.with_label_values(&["deny"]).inc_by(2);
    m.plans_total.with_label_values(&["not_allowlisted"]).inc();
    m.plans_total
        .with_label_values(&["skip_decision"])
        .inc_by(4);
    m.plans_total.with_label_values(&["malformed"]).inc_by(5);
    let later = t0 + SUMMARY_EVERY + Duration::from_secs(1);
    assert_eq!(
        s.tick(&m, later).as_deref(),
        Some("P3.3 plans last 60s: allow=3 deny=2 not_allowlisted=1 skip=4 malformed=5")
    );
    assert_eq!(s.tick(&m, later), None, "once per period");
    let much_later = later + SUMMARY_EVERY + Duration::from_secs(1);
    assert_eq!(
        s.tick(&m, much_later).as_deref(),
        Some("P3.3 plans last 60s: allow=0 deny=0 not_allowlisted=0 skip=0 malformed=0")
    );
}

#[test]
fn id8_is_char_safe() {
    assert_eq!(id8("abcdef0123"), "abcdef01");
    assert_eq!(id8("abc"), "abc");
    assert_eq!(id8("ééééééééé"), "éééééééé");
}
