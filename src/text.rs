//! Text helpers shared by every stage: cutting echoed raw values, keeping
//! secrets out of output ([`Secret`]), writing Python's formats.
//!
//! A raw value from Redis, the exchange or a plan that is echoed into a deny
//! context or a log line is cut to [`ECHO_MAX_CHARS`] characters (SPEC §11
//! "Input bounds"): a 1 MB cooldown value must not become a 1 MB permit or a
//! 1 MB log line.

use std::borrow::Cow;
use std::fmt;

/// The most characters of a raw value ever echoed.
pub(crate) const ECHO_MAX_CHARS: usize = 64;

/// A string that must never reach a log line, a panic message or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: call only where a request header, a signature or a
    /// Redis AUTH is built.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `s` cut to [`ECHO_MAX_CHARS`] characters, with `…` when something was
/// cut, and its control characters escaped (`\n`, `\u{1b}`): an echoed value
/// can neither forge a log line nor paint the operator's terminal (SPEC §11).
pub(crate) fn clip(s: &str) -> Cow<'_, str> {
    clip_to(s, ECHO_MAX_CHARS)
}

/// The most characters of a JSON text (a record's plan or inputs, a
/// permit) `explain` and `replay` print (SPEC §14).
pub(crate) const JSON_MAX_CHARS: usize = 1024;

/// `s` cut to `max` characters (with `…`), then its control characters
/// escaped: [`clip`] for a longer text.
pub(crate) fn clip_to(s: &str, max: usize) -> Cow<'_, str> {
    let (head, cut) = match s.char_indices().nth(max) {
        None => (s, false),
        Some((i, _)) => (&s[..i], true),
    };
    if !cut && !head.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(head.len() + 4);
    for c in head.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if cut {
        out.push('…');
    }
    Cow::Owned(out)
}

/// Raw bytes for an echo: valid UTF-8 as text, anything else with its
/// invalid bytes escaped (`\xNN`), then cut like [`clip`].
pub(crate) fn clip_bytes(b: &[u8]) -> String {
    let head = &b[..b.len().min(ECHO_MAX_CHARS * 4)];
    let text = escape_lossy(head);
    let cut = clip(&text).into_owned();
    if b.len() > head.len() && !cut.ends_with('…') {
        format!("{cut}…")
    } else {
        cut
    }
}

/// Valid UTF-8 runs as they are, every invalid byte as `\xNN`.
fn escape_lossy(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02X}"));
        }
    }
    out
}

/// Whole epoch seconds as RFC 3339 UTC (`2026-12-07T15:04:05Z`), what an
/// operator reads in `ctl status`; a value that is not a time in years
/// 1970–9999 is shown as it was given (cut and escaped).
pub(crate) fn rfc3339(epoch: &str) -> String {
    let Some(secs) = epoch
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|s| *s < 253_402_300_800)
    else {
        return clip(epoch).into_owned();
    };
    let (y, m, d, hh, mm, ss) = civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// Epoch seconds as a UTC civil date and time (proleptic Gregorian, after
/// H. Hinnant's days-to-civil): year, month, day, hour, minute, second.
fn civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Epoch milliseconds as Python's `datetime.utcnow().isoformat()` writes
/// them (`2026-12-07T15:04:05.123000`: no zone, microseconds, and no
/// fraction at all when it is zero): the pipeline's `trade.closed` time
/// (SPEC §19).
pub(crate) fn py_utc_isoformat(ms: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(ms / 1000);
    let micros = ms % 1000 * 1000;
    if micros == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{micros:06}")
    }
}

/// A float as Python's `str(float)` writes it: the shortest digits that
/// read back to it, `.0` on a whole number, and an exponent (`1e-05`,
/// `1.5e+16`) below 1e-4 or from 1e16 on: the pipeline's formats for
/// prices and PnL (SPEC §19). Not finite: `nan`, `inf`, `-inf`.
pub(crate) fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's shortest round-trip digits, in scientific form: `-1.2345e3`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.unsigned_abs());
    }
    if exp < 0 {
        let zeros = "0".repeat(exp.unsigned_abs() as usize - 1);
        return format!("{sign}0.{zeros}{digits}");
    }
    let point = exp as usize + 1;
    if digits.len() <= point {
        let zeros = "0".repeat(point - digits.len());
        format!("{sign}{digits}{zeros}.0")
    } else {
        let (int, frac) = digits.split_at(point);
        format!("{sign}{int}.{frac}")
    }
}

/// `s` with the userinfo of every URL in it replaced (`scheme://user:pw@host`
/// → `scheme://[redacted]@host`, SPEC §17): the authority is what follows
/// `://` up to the next `/`, `?`, `#` or blank; everything in it up to its
/// last `@` goes. Text without such a URL is returned as it is.
pub(crate) fn redact_userinfo(s: &str) -> Cow<'_, str> {
    if !s.contains("://") || !s.contains('@') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let mut end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        // The `/` of another URL's `://` (`x=http://a@b,y=ws://c@d`): this
        // authority ends where that URL's scheme begins.
        if tail[..end].ends_with(':') && tail[end..].starts_with("//") {
            let before = &tail[..end - 1];
            let scheme = before
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-')))
                .map_or(0, |i| i + 1);
            end = scheme;
        }
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("[redacted]");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_read_as_rfc3339_utc() {
        for (epoch, want) in [
            ("0", "1970-01-01T00:00:00Z"),
            ("951782400", "2000-02-29T00:00:00Z"),
            ("1769920585", "2026-02-01T04:36:25Z"),
            ("1796656924", "2026-12-07T15:22:04Z"),
            ("253402300799", "9999-12-31T23:59:59Z"),
            ("253402300800", "253402300800"),
            ("-5", "-5"),
            ("soon\n", "soon\\n"),
        ] {
            assert_eq!(rfc3339(epoch), want, "{epoch}");
        }
    }

    #[test]
    fn floats_are_written_as_python_writes_them() {
        // Each `want` is what python3 -c 'print(str(float(x)))' printed.
        for (x, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (60000.0, "60000.0"),
            (60000.5, "60000.5"),
            (-1.25, "-1.25"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.000012345, "1.2345e-05"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (-0.42, "-0.42"),
            (2.0 / 3.0, "0.6666666666666666"),
            (1e-300, "1e-300"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(py_float(x), want, "{x}");
        }
    }

    #[test]
    fn times_are_written_as_utcnow_isoformat() {
        for (ms, want) in [
            (0, "1970-01-01T00:00:00"),
            (1_765_130_222_123, "2025-12-07T17:57:02.123000"),
            (1_765_130_222_000, "2025-12-07T17:57:02"),
            (1_709_164_800_001, "2024-02-29T00:00:00.001000"),
        ] {
            assert_eq!(py_utc_isoformat(ms), want, "{ms}");
        }
    }

    #[test]
    fn clips_at_64_characters() {
        assert_eq!(clip("short"), "short");
        let exact = "x".repeat(64);
        assert_eq!(clip(&exact), exact.as_str());
        let long = "é".repeat(1_000_000);
        let c = clip(&long);
        assert_eq!(c.chars().count(), 65);
        assert!(c.ends_with('…'));
    }

    #[test]
    fn control_characters_are_escaped() {
        for (raw, want) in [
            ("a\nb", "a\\nb"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("tab\there\r", "tab\\there\\r"),
            ("caf\u{e9} \u{a0}ok", "caf\u{e9} \u{a0}ok"),
        ] {
            assert_eq!(clip(raw), want, "{raw:?}");
        }
        let forged = format!("x\n{}", "y".repeat(100));
        let c = clip(&forged);
        assert!(!c.contains('\n') && c.ends_with('…'), "{c}");
    }

    #[test]
    fn bytes_are_escaped_and_clipped() {
        assert_eq!(clip_bytes(b"plan\xff1"), "plan\\xFF1");
        let big = vec![0xffu8; 1 << 20];
        let c = clip_bytes(&big);
        assert!(c.chars().count() <= 65, "{c}");
        assert!(c.ends_with('…'));
    }

    #[test]
    fn userinfo_is_redacted_wherever_a_url_is() {
        for (given, want) in [
            ("https://u:p@host:1/x?y", "https://[redacted]@host:1/x?y"),
            ("wss://key@h", "wss://[redacted]@h"),
            (
                "GET http://a:b@h/p failed",
                "GET http://[redacted]@h/p failed",
            ),
            ("https://host/a@b", "https://host/a@b"),
            ("no url @ all", "no url @ all"),
            (
                "x=http://a@b,y=ws://c:d@e/f",
                "x=http://[redacted]@b,y=ws://[redacted]@e/f",
            ),
        ] {
            assert_eq!(redact_userinfo(given), want, "{given}");
        }
    }
}
