//! Unit tests of `allowlist`.

use super::*;

const NOW: f64 = 1_769_920_625.0;
const LIM: Limits = Limits { max_age_s: 300.0 };

fn doc(symbols: &[&str], asof: f64) -> Doc {
    Doc::Text(
        serde_json::json!({"symbols": symbols, "asof_epoch": asof, "source": "test",
            "mode": "top", "filters": {}})
        .to_string(),
    )
}
fn meta(stale: &str, count: &str, asof: f64) -> HashMap<String, String> {
    [
        ("stale", stale.to_string()),
        ("count", count.to_string()),
        ("asof_epoch", asof.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
fn fresh() -> UniverseRead {
    UniverseRead {
        active: doc(&["BTCUSDT", "ETHUSDT"], NOW - 40.0),
        meta: meta("0", "2", NOW - 40.0),
        last_ok: doc(&["BTCUSDT"], NOW - 100.0),
    }
}
fn env(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

struct Row {
    name: &'static str,
    read: Result<UniverseRead, ()>,
    env: Vec<String>,
    mode: AllowlistMode,
    now: f64,
    source: Source,
    count: usize,
    refused: Vec<(Source, Refusal)>,
}

fn with(f: impl FnOnce(&mut UniverseRead)) -> Result<UniverseRead, ()> {
    let mut r = fresh();
    f(&mut r);
    Ok(r)
}

#[test]
fn tiers_and_refusal_reasons() {
    use Refusal::*;
    use Source::*;
    let u = AllowlistMode::Universe;
    let rows = vec![
        Row {
            name: "fresh universe",
            read: Ok(fresh()),
            env: env(&["SOLUSDT"]),
            mode: u,
            now: NOW,
            source: Universe,
            count: 2,
            refused: vec![],
        },
        Row {
            name: "active missing",
            read: with(|r| r.active = Doc::Missing),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, Missing)],
        },
        Row {
            name: "meta stale=1",
            read: with(|r| r.meta = meta("1", "2", NOW)),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, Stale)],
        },
        Row {
            name: "meta missing counts as stale",
            read: with(|r| r.meta.clear()),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, Stale)],
        },
        Row {
            name: "meta stale unparseable",
            read: with(|r| {
                r.meta.insert("stale".into(), "no".into());
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "meta asof_epoch NaN",
            read: with(|r| {
                r.meta.insert("asof_epoch".into(), "NaN".into());
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "meta count NaN",
            read: with(|r| {
                r.meta.insert("count".into(), "NaN".into());
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "meta stale inf",
            read: with(|r| {
                r.meta.insert("stale".into(), "inf".into());
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "meta asof_epoch -inf",
            read: with(|r| {
                r.meta.insert("asof_epoch".into(), "-inf".into());
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "meta count 0",
            read: with(|r| r.meta = meta("0", "0", NOW)),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, Empty)],
        },
        Row {
            name: "meta count missing",
            read: with(|r| {
                r.meta.remove("count");
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, Empty)],
        },
        Row {
            name: "meta asof missing is too old",
            read: with(|r| {
                r.meta.remove("asof_epoch");
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, TooOld)],
        },
        Row {
            name: "universe age exactly MAX_AGE accepted",
            read: with(|r| r.meta = meta("0", "2", NOW - 300.0)),
            env: vec![],
            mode: u,
            now: NOW,
            source: Universe,
            count: 2,
            refused: vec![],
        },
        Row {
            name: "universe age MAX_AGE+1 refused",
            read: with(|r| r.meta = meta("0", "2", NOW - 301.0)),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, TooOld)],
        },
        Row {
            name: "universe asof 61s in the future",
            read: with(|r| r.meta = meta("0", "2", NOW + 61.0)),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, Future)],
        },
        Row {
            name: "universe asof 60s in the future is skew we accept",
            read: with(|r| r.meta = meta("0", "2", NOW + 60.0)),
            env: vec![],
            mode: u,
            now: NOW,
            source: Universe,
            count: 2,
            refused: vec![],
        },
        Row {
            name: "active not JSON",
            read: with(|r| r.active = Doc::Text("{nope".into())),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "active without symbols list",
            read: with(|r| r.active = Doc::Text("{\"symbols\": \"BTCUSDT\"}".into())),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "active of another type",
            read: with(|r| r.active = Doc::WrongType),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "active with only invalid symbols",
            read: with(|r| r.active = doc(&["btc", "", "BTC-USDT"], NOW)),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, NoSymbols)],
        },
        Row {
            name: "active over 1 MiB",
            read: with(|r| {
                r.active = Doc::Text(format!(
                    "{{\"symbols\":[\"BTCUSDT\"],\"pad\":\"{}\"}}",
                    "x".repeat(MAX_DOC_BYTES)
                ))
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "active with 10,001 symbols",
            read: with(|r| {
                let s: Vec<String> = (0..10_001).map(|i| format!("S{i}")).collect();
                r.active = Doc::Text(serde_json::json!({"symbols": s}).to_string());
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, ParseError)],
        },
        Row {
            name: "last_ok too old falls to env",
            read: with(|r| {
                r.active = Doc::Missing;
                r.last_ok = doc(&["BTCUSDT"], NOW - 301.0);
            }),
            env: env(&["SOLUSDT"]),
            mode: u,
            now: NOW,
            source: Env,
            count: 1,
            refused: vec![(Universe, Missing), (LastOk, TooOld)],
        },
        Row {
            name: "last_ok exactly MAX_AGE accepted",
            read: with(|r| {
                r.active = Doc::Missing;
                r.last_ok = doc(&["BTCUSDT"], NOW - 300.0);
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: LastOk,
            count: 1,
            refused: vec![(Universe, Missing)],
        },
        Row {
            name: "last_ok without asof is too old",
            read: with(|r| {
                r.active = Doc::Missing;
                r.last_ok = Doc::Text("{\"symbols\":[\"BTCUSDT\"]}".into());
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: None,
            count: 0,
            refused: vec![(Universe, Missing), (LastOk, TooOld), (Env, Empty)],
        },
        Row {
            name: "last_ok in the future",
            read: with(|r| {
                r.active = Doc::Missing;
                r.last_ok = doc(&["BTCUSDT"], NOW + 120.0);
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: None,
            count: 0,
            refused: vec![(Universe, Missing), (LastOk, Future), (Env, Empty)],
        },
        Row {
            name: "last_ok parse error",
            read: with(|r| {
                r.active = Doc::Missing;
                r.last_ok = Doc::Text("[]".into());
            }),
            env: env(&["SOLUSDT"]),
            mode: u,
            now: NOW,
            source: Env,
            count: 1,
            refused: vec![(Universe, Missing), (LastOk, ParseError)],
        },
        Row {
            name: "last_ok no symbols",
            read: with(|r| {
                r.active = Doc::Missing;
                r.last_ok = doc(&[], NOW);
            }),
            env: env(&["SOLUSDT"]),
            mode: u,
            now: NOW,
            source: Env,
            count: 1,
            refused: vec![(Universe, Missing), (LastOk, NoSymbols)],
        },
        Row {
            name: "redis unreadable refuses tiers 1 and 2 with load_error",
            read: Err(()),
            env: env(&["SOLUSDT"]),
            mode: u,
            now: NOW,
            source: Env,
            count: 1,
            refused: vec![(Universe, LoadError), (LastOk, LoadError)],
        },
        Row {
            name: "nothing anywhere fails closed",
            read: with(|r| {
                r.active = Doc::Missing;
                r.last_ok = Doc::Missing;
            }),
            env: vec![],
            mode: u,
            now: NOW,
            source: None,
            count: 0,
            refused: vec![(Universe, Missing), (LastOk, Missing), (Env, Empty)],
        },
        Row {
            name: "env of invalid symbols only",
            read: Err(()),
            env: env(&["btcusdt", "X Y"]),
            mode: u,
            now: NOW,
            source: None,
            count: 0,
            refused: vec![(Universe, LoadError), (LastOk, LoadError), (Env, NoSymbols)],
        },
        Row {
            name: "env mode skips the universe",
            read: Ok(fresh()),
            env: env(&["SOLUSDT", "bad"]),
            mode: AllowlistMode::Env,
            now: NOW,
            source: Env,
            count: 1,
            refused: vec![],
        },
    ];
    for row in rows {
        let r = resolve(
            row.read.as_ref().map_err(|_| ()),
            &row.env,
            row.mode,
            row.now,
            &LIM,
        );
        assert_eq!(r.source, row.source, "{}: source", row.name);
        assert_eq!(r.symbols.len(), row.count, "{}: count", row.name);
        assert_eq!(r.refused, row.refused, "{}: refusals", row.name);
    }
}

#[test]
fn log_lines_are_exact() {
    let r = resolve(Ok(&fresh()), &[], AllowlistMode::Universe, NOW, &LIM);
    assert_eq!(
        r.log_line(),
        format!(
            "P3.3 allowlist source=universe stale=0 count=2 asof_epoch={} age_s=40",
            (NOW - 40.0) as i64
        )
    );
    let mut read = fresh();
    read.meta.insert("stale".into(), "1".into());
    let r = resolve(Ok(&read), &[], AllowlistMode::Universe, NOW, &LIM);
    assert_eq!(
        r.log_line(),
        format!(
            "P3.3 allowlist source=last_ok stale=1 count=1 asof_epoch={} age_s=100",
            (NOW - 100.0) as i64
        )
    );
    let r = resolve(
        Err(()),
        &env(&["BTCUSDT"]),
        AllowlistMode::Universe,
        NOW,
        &LIM,
    );
    assert_eq!(
        r.log_line(),
        "P3.3 allowlist source=env stale=env count=1 asof_epoch=static age_s=0"
    );
    let r = resolve(Err(()), &[], AllowlistMode::Universe, NOW, &LIM);
    assert_eq!(
        r.log_line(),
        "P3.3 allowlist source=none stale=? count=0 asof_epoch=? age_s=?"
    );
    assert_eq!(
        r.refusals_text(),
        "universe=load_error last_ok=load_error env=empty"
    );
}

#[test]
fn invalid_symbols_are_dropped_and_counted() {
    let mut read = fresh();
    read.active = Doc::Text(r#"{"symbols":["BTCUSDT","ethusdt",7,"ETHUSDT","A_B"]}"#.into());
    let r = resolve(Ok(&read), &[], AllowlistMode::Universe, NOW, &LIM);
    assert_eq!(r.source, Source::Universe);
    assert_eq!(r.symbols.len(), 2);
    assert_eq!(r.dropped_invalid, 3);
    assert_eq!(
        r.dropped_examples,
        vec![
            "\"ethusdt\" (lower case; symbols are upper case (BTCUSDT))".to_string(),
            "7 (not a string)".to_string(),
            "\"A_B\" (holds characters other than A-Z and 0-9)".to_string(),
        ]
    );
    assert_eq!(r.meta_count_mismatch, None);
}

#[test]
fn meta_count_mismatch_is_reported_not_rejected() {
    let mut read = fresh();
    read.meta.insert("count".into(), "566".into());
    let r = resolve(Ok(&read), &[], AllowlistMode::Universe, NOW, &LIM);
    assert_eq!(r.source, Source::Universe);
    assert_eq!(r.meta_count_mismatch, Some(566));
    assert!(r.log_line().contains("count=2"), "count is what was loaded");
}

#[test]
fn universe_lists_expire_at_asof_plus_max_age() {
    let r = resolve(Ok(&fresh()), &[], AllowlistMode::Universe, NOW, &LIM);
    let e = r.expires_at.expect("universe data expires");
    assert_eq!(e, NOW - 40.0 + 300.0);
    let a = Allowlist {
        source: r.source,
        symbols: r.symbols,
        expires_at: r.expires_at,
    };
    assert!(a.contains("BTCUSDT", e));
    assert!(
        !a.contains("BTCUSDT", e + 0.001),
        "never used past its expiry"
    );
    assert!(!a.contains("XRPUSDT", NOW));
    assert!(!Allowlist::empty().contains("BTCUSDT", NOW));
}

#[test]
fn symbol_pattern() {
    for (s, ok) in [
        ("BTCUSDT", true),
        ("1000PEPEUSDT", true),
        ("", false),
        ("btcusdt", false),
        ("BTC-USDT", false),
        (&"A".repeat(32), true),
        (&"A".repeat(33), false),
        (" BTC", false),
    ] {
        assert_eq!(valid_symbol(s), ok, "{s:?}");
    }
}
