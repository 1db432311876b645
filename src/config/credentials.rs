//! Credentials (SPEC §17): systemd's `LoadCredential=` files (and, for
//! `--check-config` outside the unit, the credstore), read as regular
//! files, bounded, with no stray whitespace; the shipped placeholders.

use std::collections::HashMap;

use super::env::is_exchange_var;
use super::ConfigError;
use crate::text::Secret;

/// What a configuration is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The daemon: everything is required and validated.
    Daemon,
    /// `ctl`, `explain`, `replay`: only what reaches Redis and what the
    /// rules read; the exchange settings are ignored.
    Tools,
    /// `--check-config`: as the daemon, and with `CREDENTIALS_DIRECTORY`
    /// unset (a root shell, not the unit) the credentials are read where
    /// the unit's `LoadCredential=` finds them ([`CREDSTORE_DIRS`]).
    Check,
}

/// Where systemd's `LoadCredential=<name>:position-state-brain.<name>`
/// looks, in its order (SPEC §17, §18): what `--check-config` reads when
/// it runs outside the unit.
pub const CREDSTORE_DIRS: [&str; 3] = ["/etc/credstore", "/run/credstore", "/usr/lib/credstore"];

/// The credential files' name prefix in a credstore directory.
pub(super) const CREDSTORE_PREFIX: &str = "position-state-brain.";

/// Where the credential files are read from.
#[derive(Debug, Clone)]
pub(super) enum CredentialSource {
    /// None: only the environment.
    None,
    /// `$CREDENTIALS_DIRECTORY` (the unit's), files named as the credential.
    Directory(std::path::PathBuf),
    /// The credstore directories (outside the unit, `--check-config`): for
    /// each credential the first `position-state-brain.<name>` found.
    Store(Vec<std::path::PathBuf>),
}

/// The systemd credentials (SPEC §17): file in `$CREDENTIALS_DIRECTORY`,
/// and the variables it stands for (the first is the one it is read as;
/// the others are dropped: the credential wins over every name).
pub const CREDENTIALS: [(&str, &[&str]); 4] = [
    (
        "binance_api_key",
        &["BINANCE_TESTNET_API_KEY", "BINANCE_API_KEY"],
    ),
    (
        "binance_api_secret",
        &["BINANCE_TESTNET_API_SECRET", "BINANCE_API_SECRET"],
    ),
    ("redis_password", &["REDIS_PASSWORD"]),
    ("redis_sentinel_password", &["REDIS_SENTINEL_PASSWORD"]),
];

/// The largest credential file read.
pub(super) const MAX_CREDENTIAL_BYTES: u64 = 64 * 1024;

/// The largest CA file read (`REDIS_TLS_CA_FILE`).
pub(super) const MAX_CA_BYTES: u64 = 4 * 1024 * 1024;

/// Reads the credential files present in `$CREDENTIALS_DIRECTORY` into
/// `env` (a file wins over its variables; an absent file leaves them). Also
/// returns where each secret variable came from, and one error per file
/// that is unreadable, empty, too large or not UTF-8 (exit 78). A trailing
/// newline is not part of the value.
pub(super) fn credentials(
    env: HashMap<String, String>,
    purpose: Purpose,
) -> (
    HashMap<String, String>,
    HashMap<&'static str, String>,
    Vec<ConfigError>,
) {
    let source = match env
        .get("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.trim().is_empty())
    {
        Some(d) => CredentialSource::Directory(std::path::PathBuf::from(d)),
        None if purpose == Purpose::Check => CredentialSource::Store(
            CREDSTORE_DIRS
                .iter()
                .map(std::path::PathBuf::from)
                .collect(),
        ),
        None => CredentialSource::None,
    };
    credentials_from(env, purpose, source)
}

/// [`credentials`] from `source`.
pub(super) fn credentials_from(
    mut env: HashMap<String, String>,
    purpose: Purpose,
    source: CredentialSource,
) -> (
    HashMap<String, String>,
    HashMap<&'static str, String>,
    Vec<ConfigError>,
) {
    let mut sources = HashMap::new();
    let mut errors = Vec::new();
    let dir = match &source {
        CredentialSource::Directory(d) => Some(d.clone()),
        _ => None,
    };
    if let Some(d) = &dir {
        if !d.is_dir() {
            errors.push(ConfigError {
                var: "CREDENTIALS_DIRECTORY".into(),
                value: crate::text::clip(&d.to_string_lossy()).into_owned(),
                why: "is not a directory (systemd sets it to the unit's credentials)".into(),
            });
        }
    }
    for (file, names) in CREDENTIALS {
        if purpose == Purpose::Tools && names.iter().any(|n| is_exchange_var(n)) {
            // ctl, explain and replay open no exchange credential.
            continue;
        }
        // The file, and how it is named in messages.
        let found: Option<(std::path::PathBuf, String)> = match &source {
            CredentialSource::Directory(d) if d.is_dir() => {
                Some((d.join(file), format!("$CREDENTIALS_DIRECTORY/{file}")))
                    .filter(|(p, _)| std::fs::symlink_metadata(p).is_ok())
            }
            CredentialSource::Store(dirs) => dirs
                .iter()
                .map(|d| d.join(format!("{CREDSTORE_PREFIX}{file}")))
                .find(|p| std::fs::symlink_metadata(p).is_ok())
                .map(|p| {
                    let shown = crate::text::clip(&p.to_string_lossy()).into_owned();
                    (p, shown)
                }),
            _ => None,
        };
        if let Some((path, shown)) = found {
            let problem = |why: String| ConfigError {
                var: format!("{} (credential {file})", names[0]),
                value: "[not shown]".into(),
                why: format!("{shown} {why}"),
            };
            match read_secret_file(&path) {
                Ok(value) => {
                    for n in &names[1..] {
                        env.remove(*n);
                    }
                    env.insert(names[0].to_string(), value.expose().to_string());
                    let from = match &source {
                        CredentialSource::Store(_) => {
                            format!("from {shown}, as the unit loads it")
                        }
                        _ => format!("from credential {file}"),
                    };
                    sources.insert(names[0], from);
                }
                Err(why) => errors.push(problem(why)),
            }
            continue;
        }
        for n in names {
            if env.get(*n).is_some_and(|v| !v.trim().is_empty()) {
                sources.insert(*n, "from the environment".to_string());
            }
        }
    }
    // REDIS_PASSWORD_FILE, when no credential or variable gave a password.
    let file = env
        .get("REDIS_PASSWORD_FILE")
        .filter(|f| !f.trim().is_empty())
        .cloned();
    if let Some(path) = file.filter(|_| env.get("REDIS_PASSWORD").is_none_or(|p| p.is_empty())) {
        let problem = |why: String| ConfigError {
            var: "REDIS_PASSWORD_FILE".into(),
            value: crate::text::clip(&path).into_owned(),
            why,
        };
        match read_secret_file(std::path::Path::new(&path)) {
            Err(why) => errors.push(problem(why)),
            Ok(value) => {
                env.insert("REDIS_PASSWORD".into(), value.expose().to_string());
                sources.insert("REDIS_PASSWORD", "from REDIS_PASSWORD_FILE".to_string());
            }
        }
    }
    (env, sources, errors)
}

/// Whether a password is one of the shipped placeholders (`CHANGE-ME…`,
/// any case, `_` for `-`).
pub fn is_placeholder(password: &str) -> bool {
    password
        .trim()
        .to_ascii_uppercase()
        .replace('_', "-")
        .starts_with("CHANGE-ME")
}

/// Reads a file that must be a regular file (SPEC §17): it is opened
/// non-blocking (a FIFO never hangs the open) and checked with `fstat`
/// before a byte is read, so a FIFO, a device, a socket or a directory is
/// an error, never a wait. At most `max` bytes: more is an error.
pub fn read_regular_file(path: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot be read: {}", e.kind()))?;
    let t = f
        .metadata()
        .map_err(|e| format!("cannot be read: {}", e.kind()))?
        .file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!("is {what}, not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read: {}", e.kind()))?;
    if bytes.len() as u64 > max {
        return Err(format!("is larger than {max} bytes"));
    }
    Ok(bytes)
}

/// A secret's file, read as a secret (SPEC §17): a regular file
/// ([`read_regular_file`]), UTF-8, one trailing newline (`\n` or `\r\n`)
/// dropped; empty, or with any other leading or trailing whitespace, is an
/// error (a `'secret '` would fail every signed request with no line
/// naming the file). The error says why, never the value.
pub fn read_secret_file(path: &std::path::Path) -> Result<Secret, String> {
    let bytes = read_regular_file(path, MAX_CREDENTIAL_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())?;
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if value.trim().is_empty() {
        return Err("is empty".into());
    }
    if value.trim() != value {
        return Err(
            "has whitespace before or after the secret (only one trailing newline is dropped): remove it"
                .into(),
        );
    }
    Ok(Secret::new(value))
}
