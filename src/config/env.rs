//! The process environment and the ctl env file (SPEC §12, §17): what
//! `ctl`, `explain` and `replay` read when run from a shell.

use super::vars::{var_named, CTL_ENV_FILE};

/// This machine's host name, for the default consumer name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The process environment as text: every variable whose name and value are
/// UTF-8, and the names of those of ours (`P33_*` and every name
/// [`var_named`] knows) whose value is not. Another service's variable that
/// is not UTF-8 is none of our business and left out; nothing here panics
/// (`std::env::vars` would) or shows a value.
pub fn env_text() -> (Vec<(String, String)>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut bad = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Ok(k) = k.into_string() else { continue };
        match v.into_string() {
            Ok(v) => pairs.push((k, v)),
            Err(_) if k.starts_with("P33_") || var_named(&k).is_some() => bad.push(k),
            Err(_) => {}
        }
    }
    bad.sort();
    (pairs, bad)
}

/// The `REDIS_*` settings of an env file (`NAME=value` lines, `#` comments,
/// optional quotes), and the names of other variables it holds (ignored:
/// the file holds Redis settings only).
pub fn parse_ctl_env(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut ignored = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim();
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        if k.starts_with("REDIS_") {
            pairs.push((k.to_string(), v.to_string()));
        } else {
            ignored.push(crate::text::clip(k).into_owned());
        }
    }
    (pairs, ignored)
}

/// The ctl env file's Redis settings (SPEC §12), `[]` when there is none;
/// a file that is there but cannot be read is said on stderr (never its
/// contents), and the environment alone is used.
pub(super) fn ctl_env_pairs(env: &[(String, String)]) -> Vec<(String, String)> {
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "P33_CTL_ENV_FILE")
        .map_or(CTL_ENV_FILE, |(_, v)| v.as_str());
    // Echoed below: from the environment, so cut and escaped (SPEC §11).
    let shown = crate::text::clip(path);
    let text = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            eprintln!(
                "warning: {shown} cannot be read ({}): is this user in group p33-ops? Using the environment alone",
                e.kind()
            );
            return Vec::new();
        }
        Ok(b) if b.len() > 64 * 1024 => {
            eprintln!("warning: {shown} is larger than 64 KiB: not read");
            return Vec::new();
        }
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
    };
    let (pairs, ignored) = parse_ctl_env(&text);
    if !ignored.is_empty() {
        eprintln!(
            "warning: {shown} holds Redis settings only; ignored: {}",
            ignored.join(", ")
        );
    }
    pairs
}

/// Whether `name` is an exchange setting (credentials, URLs): what the
/// tools never validate or read.
pub(super) fn is_exchange_var(name: &str) -> bool {
    name.starts_with("BINANCE_") || name.starts_with("P33_EXCHANGE_")
}
