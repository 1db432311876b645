//! Text helpers shared by every stage: cutting echoed raw values.
//!
//! A raw value from Redis, the exchange or a plan that is echoed into a deny
//! context or a log line is cut to [`ECHO_MAX_CHARS`] characters (SPEC §11
//! "Input bounds"): a 1 MB cooldown value must not become a 1 MB permit or a
//! 1 MB log line.

use std::borrow::Cow;

/// The most characters of a raw value ever echoed.
pub(crate) const ECHO_MAX_CHARS: usize = 64;

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
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (proleptic Gregorian), after H. Hinnant.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
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
