//! Unit tests of `book`.

use super::*;
use crate::domain::PositionSide;
use serde_json::json;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn rest(rows: serde_json::Value) -> HashMap<String, Legs> {
    super::super::positions::parse_rest_legs(&rows, 0, u64::MAX).unwrap()
}

fn ev(t: u64, legs: &[(&str, Leg, &str)]) -> AccountUpdate {
    AccountUpdate {
        event_ms: t + 1,
        tx_ms: t,
        reason: "order".into(),
        legs: legs
            .iter()
            .map(|(s, l, a)| EventLeg {
                symbol: s.to_string(),
                leg: *l,
                amt: d(a),
                entry_price: "100".into(),
                unrealized_pnl: "0".into(),
            })
            .collect(),
    }
}

fn all() -> HashSet<String> {
    ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
        .into_iter()
        .map(String::from)
        .collect()
}

fn clock(local_ms: u64) -> Clock {
    Clock {
        local_ms,
        exchange_ms: 1_000_000,
    }
}

/// A reply asked (locally) just before it is applied at `now`.
fn rest_apply(
    b: &mut Book,
    legs: &HashMap<String, Legs>,
    asked_ms: u64,
    now: u64,
    force: bool,
) -> Vec<Correction> {
    rest_asked(b, legs, asked_ms, now.saturating_sub(1), now, force)
}

fn rest_asked(
    b: &mut Book,
    legs: &HashMap<String, Legs>,
    asked_ms: u64,
    asked_local_ms: u64,
    now: u64,
    force: bool,
) -> Vec<Correction> {
    let covers = all();
    let reply = Reply {
        legs,
        asked_ms,
        asked_local_ms,
        covers: &covers,
    };
    b.apply_rest(reply, clock(now), force, &covers)
}

fn event_apply(b: &mut Book, ev: &AccountUpdate, now: u64) -> Applied {
    b.apply_event(ev, clock(now), &all(), 1)
}

/// SPEC §19: Binance sends one `ACCOUNT_UPDATE` per fill of an order,
/// often with one `T`: on one connection they apply in arrival order;
/// the same `T` from another connection (a replacement's overlap
/// delivers it twice) or against a REST row is stale.
#[test]
fn several_updates_with_one_t_apply_in_order_on_one_connection() {
    let mut b = Book::default();
    rest_apply(&mut b, &rest(json!([])), 1, 1, false);
    for (conn, t, amt, applied, want) in [
        (1, 10, "0.02", true, "0.02"),
        (1, 10, "0.04", true, "0.04"),
        (1, 10, "1", true, "1"),
        // The same event again on the replacement: already applied.
        (2, 10, "0.02", false, "1"),
        (2, 11, "0.5", true, "0.5"),
        // The old connection's late copy of an older fill.
        (1, 10, "0.04", false, "0.5"),
        (2, 11, "0.7", true, "0.7"),
    ] {
        let a = b.apply_event(
            &ev(t, &[("BTCUSDT", Leg::Both, amt)]),
            clock(2),
            &all(),
            conn,
        );
        assert_eq!(a.symbols.len() == 1, applied, "conn {conn} T {t} {amt}");
        assert_eq!(amt_of(&b, "BTCUSDT"), want, "after conn {conn} T {t} {amt}");
    }
    // REST sets the leg at T 20: an event with that T is stale, on any
    // connection; a newer one applies.
    let row = rest(json!([{"symbol": "BTCUSDT", "positionAmt": "3", "updateTime": 20}]));
    rest_apply(&mut b, &row, 25, 5, false);
    assert_eq!(amt_of(&b, "BTCUSDT"), "3");
    let a = b.apply_event(&ev(20, &[("BTCUSDT", Leg::Both, "2")]), clock(6), &all(), 2);
    assert_eq!((a.stale, amt_of(&b, "BTCUSDT")), (1, "3".to_string()));
    b.apply_event(&ev(21, &[("BTCUSDT", Leg::Both, "2")]), clock(7), &all(), 2);
    assert_eq!(amt_of(&b, "BTCUSDT"), "2");
}

fn amt_of(b: &Book, s: &str) -> String {
    amt(b, s).1
}

fn amt(b: &Book, s: &str) -> (PositionSide, String) {
    let p = b.position(s);
    (p.side, crate::domain::dec_str(p.amt))
}

/// The order rule, as a table: start from REST (BTC 1 at t=100), then
/// one step; the amount and feed that result.
#[test]
fn the_order_rule() {
    enum Step {
        Event(u64, &'static str),
        Rest(u64, &'static str),
    }
    let cases: &[(&str, Step, &str, Feed, usize)] = &[
        (
            "a newer event applies",
            Step::Event(101, "2"),
            "2",
            Feed::Stream,
            0,
        ),
        (
            "an event as old as the state is stale",
            Step::Event(100, "2"),
            "1",
            Feed::Rest,
            0,
        ),
        (
            "an older event is stale",
            Step::Event(50, "2"),
            "1",
            Feed::Rest,
            0,
        ),
        (
            "a REST row as old as the state applies",
            Step::Rest(100, "1"),
            "1",
            Feed::Rest,
            0,
        ),
        (
            "an older REST row is ignored",
            Step::Rest(99, "3"),
            "1",
            Feed::Rest,
            0,
        ),
        (
            "a newer REST row applies",
            Step::Rest(150, "3"),
            "3",
            Feed::Rest,
            0,
        ),
    ];
    for (name, step, want, feed, corrections) in cases {
        let mut b = Book::default();
        rest_apply(
            &mut b,
            &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "1", "updateTime": 100}])),
            90,
            1,
            false,
        );
        let c = match step {
            Step::Event(t, a) => {
                event_apply(&mut b, &ev(*t, &[("BTCUSDT", Leg::Both, a)]), 2);
                0
            }
            Step::Rest(t, a) => rest_apply(
                &mut b,
                &rest(json!([{"symbol": "BTCUSDT", "positionAmt": a, "updateTime": t}])),
                t - 1,
                2,
                false,
            )
            .len(),
        };
        assert_eq!(
            crate::domain::dec_str(b.position("BTCUSDT").amt),
            *want,
            "{name}"
        );
        assert_eq!(b.feed("BTCUSDT").unwrap().0, *feed, "{name}");
        assert_eq!(c, *corrections, "{name}");
    }
}

#[test]
fn a_rest_row_that_changes_what_the_stream_set_is_a_correction() {
    let mut b = Book::default();
    let r =
        |a: &str, t: u64| rest(json!([{"symbol": "BTCUSDT", "positionAmt": a, "updateTime": t}]));
    rest_apply(&mut b, &r("0", 10), 5, 1, false);
    event_apply(&mut b, &ev(20, &[("BTCUSDT", Leg::Both, "1")]), 2);
    // REST confirming the stream is no correction, and confirms it.
    assert!(rest_apply(&mut b, &r("1", 20), 21, 3, false).is_empty());
    event_apply(&mut b, &ev(30, &[("BTCUSDT", Leg::Both, "2")]), 4);
    // An event swallowed: REST knows of 40, the stream stopped at 30.
    let c = rest_apply(&mut b, &r("5", 40), 41, 5, false);
    assert_eq!(
        c,
        vec![Correction {
            symbol: "BTCUSDT".into(),
            leg: Leg::Both,
            stream_amt: d("2"),
            rest_amt: d("5")
        }]
    );
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "5".into()));
    // REST older than the stream's newest, asked before the event
    // came: no correction, no change, though it agrees with the reply
    // before it.
    event_apply(&mut b, &ev(50, &[("BTCUSDT", Leg::Both, "6")]), 6);
    assert!(rest_asked(&mut b, &r("5", 40), 49, 5, 7, false).is_empty());
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "6".into()));
    // Asked after it, and still agreeing: the replies win.
    let c = rest_asked(&mut b, &r("5", 40), 49, 8, 9, false);
    assert_eq!(c.len(), 1);
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "5".into()));
}

/// An exchange time ahead of the exchange's clock as we know it can
/// never pin a leg: it is taken as now (beyond [`MAX_AHEAD_MS`] it never
/// reaches the book: the reader rejects it), so later events apply; and
/// two replies in a row that agree win whatever the times say.
#[test]
fn no_exchange_time_pins_a_leg() {
    let mut b = Book::default();
    let r =
        |a: &str, t: u64| rest(json!([{"symbol": "BTCUSDT", "positionAmt": a, "updateTime": t}]));
    rest_apply(&mut b, &r("1.5", 900_000), 999_000, 1, false);
    // 4 s ahead of the exchange clock (1_000_000): taken as 1_000_000.
    event_apply(&mut b, &ev(1_004_000, &[("BTCUSDT", Leg::Both, "1000")]), 2);
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "1000".into()));
    // A real event a moment later applies.
    let later = Clock {
        local_ms: 3,
        exchange_ms: 1_000_500,
    };
    let a = b.apply_event(
        &ev(1_000_400, &[("BTCUSDT", Leg::Both, "2")]),
        later,
        &all(),
        1,
    );
    assert_eq!((a.stale, a.symbols.len()), (0, 1));
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "2".into()));
    // A REST row ahead is taken as now too: the next real one applies.
    let mut b = Book::default();
    rest_apply(&mut b, &r("7", 1_004_999), 1_000_000, 5, false);
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "7".into()));
    let c = rest_apply(&mut b, &r("1.5", 1_000_000), 1_000_000, 7, false);
    assert!(c.is_empty());
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "1.5".into()));
    // Whatever the state's time, two replies that agree against it win.
    let mut stuck = Book::default();
    rest_apply(&mut stuck, &r("1000", 1_000_000), 1_000_000, 1, false);
    for (now, want) in [(3, "1000"), (5, "1.5")] {
        rest_apply(&mut stuck, &r("1.5", 10), 1_000_000, now, false);
        assert_eq!(
            amt(&stuck, "BTCUSDT"),
            (PositionSide::Long, want.into()),
            "at {now}"
        );
    }
}

/// Memory is bounded by the allowlist: a feed naming symbols that are
/// not on it stores nothing, and a symbol that joins the allowlist is
/// known only once a reply asked while it was on it has been applied.
#[test]
fn only_allowlisted_symbols_are_stored_and_known() {
    let mut b = Book::default();
    rest_apply(&mut b, &rest(json!([])), 1, 1, false);
    let names: Vec<String> = (0..50_000).map(|i| format!("X{i}USDT")).collect();
    let legs: Vec<(&str, Leg, &str)> = names.iter().map(|n| (n.as_str(), Leg::Both, "1")).collect();
    let a = event_apply(&mut b, &ev(10, &legs), 2);
    assert_eq!((a.dropped, a.symbols.len(), b.stored()), (50_000, 0, 0));
    assert!(b.knows("BTCUSDT") && !b.knows("X1USDT"));
    // A reply of every symbol stores only the allowlisted ones.
    let rows: Vec<serde_json::Value> = names
        .iter()
        .map(|n| json!({"symbol": n, "positionAmt": "1", "updateTime": 5}))
        .collect();
    rest_apply(&mut b, &rest(serde_json::Value::Array(rows)), 20, 3, false);
    assert_eq!(b.stored(), 0);
    // X1USDT joins: its events are stored from then on, but it is known
    // only after a reply that covers it.
    let mut now_allowed = all();
    now_allowed.insert("X1USDT".into());
    b.apply_event(
        &ev(30, &[("X1USDT", Leg::Both, "2")]),
        clock(4),
        &now_allowed,
        1,
    );
    assert!(!b.knows("X1USDT"));
    let covers = now_allowed.clone();
    let one = rest(json!([{"symbol": "X1USDT", "positionAmt": "2", "updateTime": 30}]));
    let reply = Reply {
        legs: &one,
        asked_ms: 31,
        asked_local_ms: 5,
        covers: &covers,
    };
    b.apply_rest(reply, clock(6), false, &now_allowed);
    assert!(b.knows("X1USDT"));
    assert_eq!(amt(&b, "X1USDT"), (PositionSide::Long, "2".into()));
    // Off the allowlist again: the next reply drops it.
    rest_apply(&mut b, &rest(json!([])), 40, 8, false);
    assert_eq!((b.stored(), b.knows("X1USDT")), (0, false));
}

#[test]
fn hedge_mode_legs_fold_like_rest_rows() {
    let mut b = Book::default();
    rest_apply(
        &mut b,
        &rest(json!([
            {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "LONG", "updateTime": 1, "markPrice": "3000"},
            {"symbol": "ETHUSDT", "positionAmt": "0", "positionSide": "SHORT", "updateTime": 1, "markPrice": "3000"}
        ])),
        1,
        1,
        false,
    );
    event_apply(&mut b, &ev(10, &[("ETHUSDT", Leg::Short, "-2")]), 2);
    let p = b.position("ETHUSDT");
    assert_eq!((p.side, p.amt), (PositionSide::Short, d("-2")));
    assert_eq!(p.mark_price, "3000", "the event keeps REST's mark price");
    event_apply(&mut b, &ev(11, &[("ETHUSDT", Leg::Long, "1")]), 3);
    assert_eq!(b.position("ETHUSDT").side, PositionSide::Hedged);
    event_apply(&mut b, &ev(12, &[("ETHUSDT", Leg::Short, "0")]), 4);
    assert_eq!(amt(&b, "ETHUSDT"), (PositionSide::Long, "1".into()));
}

#[test]
fn absent_and_invalid_symbols() {
    let mut b = Book::default();
    assert!(!b.known());
    event_apply(&mut b, &ev(10, &[("SOLUSDT", Leg::Both, "3")]), 1);
    // A reply asked after the event that leaves the symbol out: flat.
    rest_apply(&mut b, &rest(json!([])), 11, 2, false);
    assert!(b.known());
    assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::None, "0".into()));
    // Asked before a newer event: the event stands.
    event_apply(&mut b, &ev(20, &[("SOLUSDT", Leg::Both, "4")]), 3);
    rest_apply(&mut b, &rest(json!([])), 15, 4, false);
    assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::Long, "4".into()));
    // Invalid rows win over the stream until a valid reply.
    rest_apply(
        &mut b,
        &rest(json!([{"symbol": "SOLUSDT", "positionAmt": "lots", "updateTime": 1}])),
        30,
        5,
        false,
    );
    assert_eq!(
        event_apply(&mut b, &ev(40, &[("SOLUSDT", Leg::Both, "1")]), 6).stale,
        1
    );
    assert_eq!(b.position("SOLUSDT").side, PositionSide::Hedged);
    rest_apply(
        &mut b,
        &rest(json!([{"symbol": "SOLUSDT", "positionAmt": "1", "updateTime": 41}])),
        42,
        7,
        false,
    );
    assert_eq!(amt(&b, "SOLUSDT"), (PositionSide::Long, "1".into()));
}

#[test]
fn without_the_stream_rest_replaces_everything() {
    let mut b = Book::default();
    rest_apply(
        &mut b,
        &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "1", "updateTime": 100}])),
        1,
        1,
        true,
    );
    // An older updateTime still replaces: polling alone, as before.
    rest_apply(
        &mut b,
        &rest(json!([{"symbol": "BTCUSDT", "positionAmt": "2", "updateTime": 5}])),
        1,
        2,
        true,
    );
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::Long, "2".into()));
    rest_apply(&mut b, &rest(json!([])), 1, 3, true);
    assert_eq!(amt(&b, "BTCUSDT"), (PositionSide::None, "0".into()));
}
