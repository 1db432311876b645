//! Text helpers shared by every stage: cutting echoed raw values.
//!
//! A raw value from Redis, the exchange or a plan that is echoed into a deny
//! context or a log line is cut to [`ECHO_MAX_CHARS`] characters (SPEC §11
//! "Input bounds"): a 1 MB cooldown value must not become a 1 MB permit or a
//! 1 MB log line.

use std::borrow::Cow;

/// The most characters of a raw value ever echoed.
pub(crate) const ECHO_MAX_CHARS: usize = 64;

/// `s` cut to [`ECHO_MAX_CHARS`] characters, with `…` when something was cut.
pub(crate) fn clip(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(ECHO_MAX_CHARS) {
        None => Cow::Borrowed(s),
        Some((i, _)) => Cow::Owned(format!("{}…", &s[..i])),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bytes_are_escaped_and_clipped() {
        assert_eq!(clip_bytes(b"plan\xff1"), "plan\\xFF1");
        let big = vec![0xffu8; 1 << 20];
        let c = clip_bytes(&big);
        assert!(c.chars().count() <= 65, "{c}");
        assert!(c.ends_with('…'));
    }
}
