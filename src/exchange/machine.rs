//! The user data stream's states (SPEC §16), as a pure type tested with
//! tables: connecting → reconciling → live, and back to connecting on any
//! loss. The stream task feeds it what happened and does what it answers;
//! it holds no socket and reads no clock.
//!
//! - **Connecting**: no socket. Events are not applied; snapshots come
//!   from REST alone.
//! - **Reconciling**: the socket is open, one positionRisk is under way;
//!   events are buffered (at most [`MAX_BUFFERED`], and at most
//!   [`MAX_BUFFERED_BYTES`] of them).
//! - **Live**: the reply was applied, then the buffered events; every event
//!   is applied as it comes.

use std::time::Duration;

use super::book::AccountUpdate;

/// Events buffered while reconciling; one more is a reason to reconnect
/// (the reconcile is too slow for the account's traffic).
pub const MAX_BUFFERED: usize = 10_000;

/// Bytes of events buffered while reconciling (SPEC §16: bounded in bytes,
/// not only in count); one more is a reason to reconnect.
pub const MAX_BUFFERED_BYTES: usize = 16 * 1024 * 1024;

/// How long a connection stays live before the reconnect backoff starts
/// over (SPEC §16): one that dies soon after going live keeps backing off.
pub const STEADY_AFTER: Duration = Duration::from_secs(60);

/// The first reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);

/// The longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No socket (or one being opened).
    Connecting,
    /// Socket open, positionRisk under way, events buffered.
    Reconciling,
    /// Reconciled: events applied as they come.
    Live,
}

impl Phase {
    /// The word of the instance report and `ctl status` (`live`/`down`).
    pub fn word(self) -> &'static str {
        match self {
            Phase::Live => "live",
            Phase::Connecting | Phase::Reconciling => "down",
        }
    }
}

/// Why a connection ended: the `reason` label of
/// `p33_position_stream_reconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The listenKey could not be had, or the socket not opened.
    ConnectFailed,
    /// The exchange closed the socket, or it failed.
    Closed,
    /// No frame within the deadline after a ping.
    PingTimeout,
    /// A frame that is not JSON, or an `ACCOUNT_UPDATE` out of bounds.
    InvalidFrame,
    /// `listenKeyExpired`, `-1125` or a failed keepalive: a new key.
    KeyExpired,
    /// The reconcile's positionRisk failed.
    ReconcileFailed,
    /// More events came while reconciling than are buffered.
    BufferFull,
    /// Replaced before Binance's 24 h cut.
    Replaced,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 8] = [
        Reason::ConnectFailed,
        Reason::Closed,
        Reason::PingTimeout,
        Reason::InvalidFrame,
        Reason::KeyExpired,
        Reason::ReconcileFailed,
        Reason::BufferFull,
        Reason::Replaced,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::ConnectFailed => "connect_failed",
            Reason::Closed => "closed",
            Reason::PingTimeout => "ping_timeout",
            Reason::InvalidFrame => "invalid_frame",
            Reason::KeyExpired => "key_expired",
            Reason::ReconcileFailed => "reconcile_failed",
            Reason::BufferFull => "buffer_full",
            Reason::Replaced => "replaced",
        }
    }

    /// Whether the listenKey must be created again before reconnecting.
    pub fn new_key(self) -> bool {
        matches!(self, Reason::KeyExpired | Reason::ConnectFailed)
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The socket is open.
    Opened,
    /// A checked `ACCOUNT_UPDATE` arrived.
    Event(AccountUpdate),
    /// The reconcile's positionRisk reply was applied to the book.
    Reconciled,
    /// The connection has been live for [`STEADY_AFTER`]: the backoff
    /// starts over.
    Steady,
    /// The connection ended (or never began).
    Lost(Reason),
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask positionRisk once and apply it (then report `Reconciled`).
    Reconcile,
    /// Apply these events to the book, in this order.
    Apply(Vec<AccountUpdate>),
    /// Nothing: the event was buffered, or came with no socket.
    Hold,
    /// Now live (after `Apply` of the buffer, if any).
    GoLive,
    /// Close the socket; connect again after this delay (a new listenKey
    /// first when the reason says so).
    Reconnect(Reason, Duration),
}

/// The state machine.
#[derive(Debug)]
pub struct Machine {
    phase: Phase,
    buffered: Vec<AccountUpdate>,
    /// What the buffered events weigh, bytes.
    buffered_bytes: usize,
    /// Connections lost in a row without staying live for
    /// [`STEADY_AFTER`].
    failures: u32,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            phase: Phase::Connecting,
            buffered: Vec::new(),
            buffered_bytes: 0,
            failures: 0,
        }
    }
}

impl Machine {
    /// Where the stream is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// One step. `jitter` is a random number (any u64) for the backoff.
    pub fn on(&mut self, input: Input, jitter: u64) -> Vec<Action> {
        match (self.phase, input) {
            (Phase::Connecting, Input::Opened) => {
                self.phase = Phase::Reconciling;
                self.buffered.clear();
                self.buffered_bytes = 0;
                vec![Action::Reconcile]
            }
            (Phase::Reconciling, Input::Event(e)) => {
                let bytes = self.buffered_bytes.saturating_add(e.weight());
                if self.buffered.len() >= MAX_BUFFERED || bytes > MAX_BUFFERED_BYTES {
                    return self.lose(Reason::BufferFull, jitter);
                }
                self.buffered_bytes = bytes;
                self.buffered.push(e);
                vec![Action::Hold]
            }
            (Phase::Reconciling, Input::Reconciled) => {
                self.phase = Phase::Live;
                self.buffered_bytes = 0;
                let mut out = Vec::with_capacity(2);
                if !self.buffered.is_empty() {
                    out.push(Action::Apply(std::mem::take(&mut self.buffered)));
                }
                out.push(Action::GoLive);
                out
            }
            (Phase::Live, Input::Event(e)) => vec![Action::Apply(vec![e])],
            (Phase::Live, Input::Steady) => {
                self.failures = 0;
                vec![Action::Hold]
            }
            (_, Input::Lost(reason)) => self.lose(reason, jitter),
            // Anything else (an event with no socket, a second Opened, a
            // late Reconciled or Steady) is a stray of a connection already
            // given up.
            (_, Input::Opened | Input::Event(_) | Input::Reconciled | Input::Steady) => {
                vec![Action::Hold]
            }
        }
    }

    fn lose(&mut self, reason: Reason, jitter: u64) -> Vec<Action> {
        self.phase = Phase::Connecting;
        self.buffered.clear();
        self.buffered_bytes = 0;
        let delay = backoff(self.failures, jitter);
        self.failures = self.failures.saturating_add(1);
        vec![Action::Reconnect(reason, delay)]
    }
}

/// The reconnect delay after `failures` losses in a row without reaching
/// live: 1 s doubling to 30 s, each drawn uniformly from its upper half
/// (so many instances cut at once do not come back at once).
pub fn backoff(failures: u32, jitter: u64) -> Duration {
    let ceiling_ms = BACKOFF_MIN
        .as_millis()
        .saturating_mul(1u128 << failures.min(16))
        .min(BACKOFF_MAX.as_millis()) as u64;
    let half = ceiling_ms / 2;
    Duration::from_millis(half + jitter % (half + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u64) -> AccountUpdate {
        AccountUpdate {
            event_ms: t,
            tx_ms: t,
            legs: Vec::new(),
            reason: "order".into(),
        }
    }

    /// Each row: the inputs from a fresh machine, the phase after them, and
    /// the actions of the last input.
    #[test]
    fn transitions() {
        use Input::*;
        let cases: Vec<(&str, Vec<Input>, Phase, Vec<Action>)> = vec![
            (
                "open asks REST",
                vec![Opened],
                Phase::Reconciling,
                vec![Action::Reconcile],
            ),
            (
                "events while reconciling are held",
                vec![Opened, Event(ev(1))],
                Phase::Reconciling,
                vec![Action::Hold],
            ),
            (
                "reconciled with nothing buffered goes live",
                vec![Opened, Reconciled],
                Phase::Live,
                vec![Action::GoLive],
            ),
            (
                "reconciled applies the buffer in order, then live",
                vec![Opened, Event(ev(1)), Event(ev(2)), Reconciled],
                Phase::Live,
                vec![Action::Apply(vec![ev(1), ev(2)]), Action::GoLive],
            ),
            (
                "live applies each event",
                vec![Opened, Reconciled, Event(ev(3))],
                Phase::Live,
                vec![Action::Apply(vec![ev(3)])],
            ),
            (
                "no event is applied before a socket",
                vec![Event(ev(1))],
                Phase::Connecting,
                vec![Action::Hold],
            ),
            (
                "a late reconcile of a lost connection is not live",
                vec![Opened, Lost(Reason::Closed), Reconciled],
                Phase::Connecting,
                vec![Action::Hold],
            ),
            (
                "an invalid frame while live reconnects",
                vec![Opened, Reconciled, Lost(Reason::InvalidFrame)],
                Phase::Connecting,
                vec![Action::Reconnect(
                    Reason::InvalidFrame,
                    Duration::from_millis(500),
                )],
            ),
            (
                "events buffered before a loss are dropped with it",
                vec![
                    Opened,
                    Event(ev(1)),
                    Lost(Reason::PingTimeout),
                    Opened,
                    Reconciled,
                ],
                Phase::Live,
                vec![Action::GoLive],
            ),
        ];
        for (name, inputs, phase, last) in cases {
            let mut m = Machine::default();
            let mut got = Vec::new();
            for i in inputs {
                got = m.on(i, 0);
            }
            assert_eq!(m.phase(), phase, "{name}");
            assert_eq!(got, last, "{name}");
        }
    }

    #[test]
    fn a_full_buffer_reconnects() {
        let mut m = Machine::default();
        m.on(Input::Opened, 0);
        for t in 0..MAX_BUFFERED as u64 {
            assert_eq!(m.on(Input::Event(ev(t)), 0), vec![Action::Hold]);
        }
        let a = m.on(Input::Event(ev(0)), 0);
        assert!(matches!(a[..], [Action::Reconnect(Reason::BufferFull, _)]));
        assert_eq!(m.phase(), Phase::Connecting);
    }

    /// The buffer is bounded in bytes too: a few big events reconnect long
    /// before the count is reached.
    #[test]
    fn a_buffer_full_in_bytes_reconnects() {
        let big = |t: u64| AccountUpdate {
            event_ms: t,
            tx_ms: t,
            reason: "order".into(),
            legs: (0..1000)
                .map(|_| super::super::book::EventLeg {
                    symbol: "BTCUSDT".into(),
                    leg: super::super::positions::Leg::Both,
                    amt: rust_decimal::Decimal::ONE,
                    entry_price: "9".repeat(64),
                    unrealized_pnl: "9".repeat(64),
                })
                .collect(),
        };
        let w = big(0).weight();
        assert!(w > 100_000, "{w}");
        let fits = MAX_BUFFERED_BYTES / w;
        let mut m = Machine::default();
        m.on(Input::Opened, 0);
        for t in 0..fits as u64 {
            assert_eq!(m.on(Input::Event(big(t)), 0), vec![Action::Hold], "{t}");
        }
        let a = m.on(Input::Event(big(0)), 0);
        assert!(matches!(a[..], [Action::Reconnect(Reason::BufferFull, _)]));
        // A new connection starts with an empty buffer.
        m.on(Input::Opened, 0);
        assert_eq!(m.on(Input::Event(big(1)), 0), vec![Action::Hold]);
    }

    #[test]
    fn backoff_grows_to_thirty_seconds_and_resets_when_live() {
        let mut m = Machine::default();
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let a = m.on(Input::Lost(Reason::ConnectFailed), 0);
            let Action::Reconnect(_, d) = a[0] else {
                panic!("{a:?}")
            };
            ceilings.push(d.as_millis());
        }
        // With no jitter each delay is half its ceiling.
        assert_eq!(
            ceilings,
            vec![500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]
        );
        for f in 0..40 {
            for j in [0, 1, 12345, u64::MAX] {
                let d = backoff(f, j);
                assert!(
                    d >= Duration::from_millis(500) && d <= BACKOFF_MAX,
                    "{f} {j} {d:?}"
                );
            }
        }
        // Live, then lost at once: the backoff does not start over.
        m.on(Input::Opened, 0);
        m.on(Input::Reconciled, 0);
        let a = m.on(Input::Lost(Reason::Closed), 0);
        assert_eq!(
            a,
            vec![Action::Reconnect(Reason::Closed, Duration::from_secs(15))]
        );
        // Live and steady for a minute: it does.
        m.on(Input::Opened, 0);
        m.on(Input::Reconciled, 0);
        m.on(Input::Steady, 0);
        let a = m.on(Input::Lost(Reason::Closed), 500);
        assert_eq!(a, vec![Action::Reconnect(Reason::Closed, BACKOFF_MIN)]);
    }
}
