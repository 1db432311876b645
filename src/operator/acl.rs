//! The Redis ACL users (SPEC §17): the rules of the gate's three users, the
//! `position-state-brain acl` command that prints them with the SHA-256 of
//! their passwords (never a password, never a placeholder), and the lines
//! for the pipeline's other users, which may write anything but what only
//! the gate may write.
//!
//! The rules live here, once: `deploy/redis/users.acl` is these lines with
//! no password (a test keeps the two equal), `tests/it/security.rs` checks
//! them against every command and key the sources use.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use crate::config::is_placeholder;
use crate::config::{read_secret_file, Secret, EXIT_CONFIG};

/// The daemon's user: exactly the commands and keys it uses. Its plans and
/// results streams are readable, and only its group commands may write
/// them (a selector): it cannot `XADD` a plan. The pipeline's
/// `trade.closed` stream it may only add to (SPEC §19).
const P33: &str = "resetkeys resetchannels -@all +ping +hello +auth +client|setname +select +role +time +info +wait +multi +exec +discard +evalsha +evalsha_ro +eval +eval_ro +script|load +function|load +function|list +get +getrange +set +del +exists +type +strlen +expire +pexpire +hget +hset +hmset +hgetall +hstrlen +zadd +zcard +zrange +zrangebyscore +zrem +zremrangebyscore +scan +xadd +xack +xread +xreadgroup +xrange +xrevrange +xautoclaim +xpending +xgroup|create +xgroup|setid +xgroup|createconsumer +xinfo|stream +xinfo|groups +xinfo|consumers %R~quantum:cfg:universe:* %R~quantum:cooldown:* %R~quantum:reconcile:hold:* %R~quantum:stream:apply.plan %R~quantum:stream:apply.result ~quantum:position:snapshot:* ~quantum:position:ledger:* ~quantum:state:positions:* ~quantum:permit:p33:* ~quantum:p33:* ~quantum:stream:p33.* (~quantum:stream:apply.plan ~quantum:stream:apply.result +xack +xautoclaim +xgroup|create +xgroup|setid +xgroup|createconsumer) (~quantum:stream:trade.closed +xadd)";

/// `ctl`'s user: reads what `status` shows; changes only through the
/// daemon's function (`FCALL`, no `EVAL`, no `SCRIPT LOAD`), whose own
/// commands the selectors allow key by key: it may set a trading state,
/// add to the control stream and end the latch, and may not delete or
/// retype the stream or set the latch.
const P33_OPS: &str = "resetkeys resetchannels -@all +ping +hello +auth +client|setname +select +role +time +info +wait +multi +exec +discard +watch +unwatch +get +getrange +exists +type +strlen +hget +hgetall +scan +xread +xrange +xrevrange +xinfo|stream +zcard +zrange %R~quantum:p33:* %R~quantum:stream:p33.* (~quantum:p33:trading_state ~quantum:p33:trading_state:* ~quantum:stream:p33.control ~quantum:p33:latch +fcall) (~quantum:p33:trading_state ~quantum:p33:trading_state:* +set +del) (~quantum:stream:p33.control +xadd) (~quantum:p33:latch +del)";

/// `explain`, `replay` and `ctl status`: plain reads, no scripting at all.
const P33_READ: &str = "resetkeys resetchannels -@all +ping +hello +auth +client|setname +select +role +time +multi +exec +discard +get +getrange +exists +type +strlen +hget +hgetall +hstrlen +scan +xread +xrange +xrevrange +xinfo|stream +zcard +zrange +zrangebyscore %R~quantum:*";

/// The gate's users, their rules and the file their password is read from
/// by default.
pub const USERS: [(&str, &str); 3] = [("p33", P33), ("p33-ops", P33_OPS), ("p33-read", P33_READ)];

/// Where `acl` reads a user's password when no `--password-file` names it:
/// the daemon's credential (as the unit loads it), the on-call's file (as
/// the ctl env file names it), the readers' file.
pub fn default_password_file(user: &str) -> Option<PathBuf> {
    match user {
        "p33" => Some(match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(d) if !d.is_empty() => Path::new(&d).join("redis_password"),
            _ => PathBuf::from("/etc/credstore/position-state-brain.redis_password"),
        }),
        "p33-ops" => Some(PathBuf::from("/etc/quantum/p33-ops.password")),
        "p33-read" => Some(PathBuf::from("/etc/quantum/p33-read.password")),
        _ => None,
    }
}

/// What only the gate may write (key prefixes, none of which a pipeline
/// service writes at HEAD).
pub use crate::redis::keys::GATE_ONLY;

/// Keyless commands that would write (or let a user write) the gate's keys
/// all the same, taken from a pipeline user: emptying the database,
/// swapping it, making this node a replica, granting itself rights,
/// loading code into the server, dropping the daemon's function library.
pub const PIPELINE_DENIED: [&str; 13] = [
    "acl",
    "config",
    "debug",
    "module",
    "flushall",
    "flushdb",
    "swapdb",
    "replicaof",
    "slaveof",
    "failover",
    "function|flush",
    "function|delete",
    "function|restore",
];

/// Whether `key` is one only the gate may write.
pub fn gate_only(key: &[u8]) -> bool {
    GATE_ONLY.iter().any(|p| key.starts_with(p.as_bytes()))
}

/// Glob patterns (Redis `stringmatch`) matching exactly the keys that start
/// with none of `prefixes`: at each point where a key can leave every
/// prefix, a negated character class; and every proper prefix itself, but
/// the empty key. Built on the trie of the prefixes, so shared beginnings
/// (`quantum:`) are walked once.
pub fn complement(prefixes: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    walk(prefixes, "", &mut out);
    out
}

fn walk(prefixes: &[&str], at: &str, out: &mut Vec<String>) {
    // A prefix that ends here covers everything below.
    if prefixes.contains(&at) {
        return;
    }
    if !at.is_empty() {
        out.push(escape(at));
    }
    let mut next: Vec<char> = prefixes
        .iter()
        .filter_map(|p| p.strip_prefix(at).and_then(|rest| rest.chars().next()))
        .collect();
    next.sort_unstable();
    next.dedup();
    let class: String = next.iter().map(|c| escape_class(*c)).collect();
    out.push(format!("{}[^{class}]*", escape(at)));
    for c in next {
        let mut deeper = at.to_string();
        deeper.push(c);
        walk(prefixes, &deeper, out);
    }
}

/// `s` with the glob's special characters escaped.
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// `c` inside a character class.
fn escape_class(c: char) -> String {
    if matches!(c, ']' | '^' | '-' | '\\') {
        format!("\\{c}")
    } else {
        c.to_string()
    }
}

/// A password as an ACL rule: `#<sha256 hex>`.
pub fn hashed(password: &Secret) -> String {
    let digest = Sha256::digest(password.expose().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("#{hex}")
}

/// A gate user's ACL line; `password` `None`: the line has no password
/// (the user cannot log in), as in the shipped file.
pub fn user_line(user: &str, rules: &str, password: Option<&Secret>) -> String {
    match password {
        Some(p) => format!("user {user} on {} {rules}", hashed(p)),
        None => format!("user {user} on {rules}"),
    }
}

/// A pipeline user's ACL line: every command but [`PIPELINE_DENIED`],
/// every channel, every key readable, and every key but the gate's
/// writable. `password` `None`: `nopass` (how the pipeline's services log
/// in as `default` today).
pub fn pipeline_line(user: &str, password: Option<&Secret>) -> String {
    let pw = password.map_or_else(|| "nopass".to_string(), hashed);
    let writable: Vec<String> = complement(&GATE_ONLY)
        .into_iter()
        .map(|p| format!("~{p}"))
        .collect();
    let denied: Vec<String> = PIPELINE_DENIED.iter().map(|c| format!("-{c}")).collect();
    format!(
        "user {user} on {pw} resetkeys resetchannels &* +@all {} %R~* {}",
        denied.join(" "),
        writable.join(" ")
    )
}

/// `position-state-brain acl`'s arguments.
#[derive(Debug, clap::Args)]
pub struct AclArgs {
    /// Print lines for these users of the rest of the pipeline instead (or
    /// `default`): everything they may do today but write the gate's keys.
    #[arg(long, num_args = 1.., value_name = "USER")]
    pub pipeline: Vec<String>,
    /// A user's password file, as USER=FILE (repeatable). Defaults: p33
    /// $CREDENTIALS_DIRECTORY/redis_password or
    /// /etc/credstore/position-state-brain.redis_password, p33-ops
    /// /etc/quantum/p33-ops.password, p33-read /etc/quantum/p33-read.password.
    #[arg(long = "password-file", value_name = "USER=FILE")]
    pub password_files: Vec<String>,
}

/// Runs `acl`: the lines on stdout, every note on stderr. Exit 0, 64 for a
/// bad argument, 78 for a password file that cannot be used (named, never
/// its content).
pub fn run(args: &AclArgs) -> i32 {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for spec in &args.password_files {
        match spec.split_once('=') {
            Some((u, f)) if !u.is_empty() && !f.is_empty() => {
                files.push((u.to_string(), PathBuf::from(f)));
            }
            _ => {
                eprintln!(
                    "acl: --password-file wants USER=FILE, not {}",
                    crate::text::clip(spec)
                );
                return crate::config::EXIT_USAGE;
            }
        }
    }
    let given = |u: &str| {
        files
            .iter()
            .rev()
            .find(|(n, _)| n == u)
            .map(|(_, f)| f.clone())
    };
    let read = |user: &str, path: &Path| -> Result<Secret, i32> {
        // A pipeline user's name is an argument: cut and escaped (SPEC §11).
        let user = crate::text::clip(user);
        match read_secret_file(path) {
            Ok(p) if is_placeholder(p.expose()) => {
                eprintln!(
                    "acl: the password of {user} in {} is a shipped placeholder (CHANGE-ME…): choose a real one",
                    crate::text::clip(&path.to_string_lossy())
                );
                Err(EXIT_CONFIG)
            }
            Ok(p) => Ok(p),
            Err(why) => {
                eprintln!(
                    "acl: the password file of {user}, {}, {why}",
                    crate::text::clip(&path.to_string_lossy())
                );
                Err(EXIT_CONFIG)
            }
        }
    };
    let mut lines = Vec::new();
    if args.pipeline.is_empty() {
        for (user, rules) in USERS {
            let (path, explicit) = match given(user) {
                Some(f) => (f, true),
                None => match default_password_file(user) {
                    Some(f) => (f, false),
                    None => continue,
                },
            };
            if !explicit && std::fs::symlink_metadata(&path).is_err() {
                eprintln!(
                    "acl: no password file for {user} at {}: its line has no password, so it cannot log in (give --password-file {user}=FILE)",
                    crate::text::clip(&path.to_string_lossy())
                );
                lines.push(user_line(user, rules, None));
                continue;
            }
            match read(user, &path) {
                Ok(p) => lines.push(user_line(user, rules, Some(&p))),
                Err(code) => return code,
            }
        }
    } else {
        for user in &args.pipeline {
            if !valid_user(user) {
                eprintln!("acl: {} is not a user name", crate::text::clip(user));
                return crate::config::EXIT_USAGE;
            }
            if USERS.iter().any(|(u, _)| u == user) {
                eprintln!("acl: {user} is one of the gate's own users, not the pipeline's");
                return crate::config::EXIT_USAGE;
            }
            match given(user) {
                Some(path) => match read(user, &path) {
                    Ok(p) => lines.push(pipeline_line(user, Some(&p))),
                    Err(code) => return code,
                },
                None if user == "default" => lines.push(pipeline_line(user, None)),
                None => {
                    eprintln!(
                        "acl: give --password-file {}=FILE: a pipeline user's line carries its password (only default may stay without one)",
                        crate::text::clip(user)
                    );
                    return crate::config::EXIT_USAGE;
                }
            }
        }
    }
    if !args.pipeline.is_empty() {
        // Taking ACL and CONFIG from `default` takes them from whoever
        // administers Redis as `default` too: ACL LOAD, a rollback.
        eprintln!(
            "acl: these users may no longer run ACL, CONFIG, FLUSHALL, REPLICAOF, FUNCTION FLUSH …: \
             keep an admin user of your own in the aclfile before you load them \
             (user admin on #<sha256 of its password> ~* &* +@all), and run ACL LOAD as it from then on"
        );
    }
    for l in lines {
        println!("{l}");
    }
    0
}

/// An ACL user name: printable ASCII with no blank (it goes into a line).
fn valid_user(u: &str) -> bool {
    !u.is_empty() && u.len() <= 128 && u.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's glob, for the patterns `complement` writes: literal
    /// characters, `*`, and `[^…]` with escapes.
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') => (0..=s.len()).any(|i| glob(&p[1..], &s[i..])),
            Some(b'[') => {
                let Some((&c, rest)) = s.split_first() else {
                    return false;
                };
                let mut i = 1;
                let neg = p.get(1) == Some(&b'^');
                if neg {
                    i += 1;
                }
                let mut hit = false;
                while i < p.len() && p[i] != b']' {
                    if p[i] == b'\\' {
                        i += 1;
                    }
                    hit |= p.get(i) == Some(&c);
                    i += 1;
                }
                hit != neg && glob(&p[i + 1..], rest)
            }
            Some(b'\\') => s.first() == p.get(1) && glob(&p[2..], &s[1..]),
            Some(&c) => s.first() == Some(&c) && glob(&p[1..], &s[1..]),
        }
    }

    #[test]
    fn the_complement_is_exact() {
        let pats = complement(&GATE_ONLY);
        let writable = |k: &str| pats.iter().any(|p| glob(p.as_bytes(), k.as_bytes()));
        use crate::redis::keys;
        let mut keys: Vec<String> = vec![
            keys::permit("plan-1"),
            keys::TRADING_STATE.into(),
            keys::trading_state("BTCUSDT"),
            keys::LATCH.into(),
            keys::CONTROL_STREAM.into(),
            keys::ARMED.into(),
            keys::PLAN_STREAM.into(),
            keys::RESULT_STREAM.into(),
            keys::snapshot("BTCUSDT"),
            keys::canonical_position("BTCUSDT"),
            keys::UNIVERSE_ACTIVE.into(),
            keys::LATCH.to_ascii_uppercase(),
            "q".into(),
            "other".into(),
        ];
        // Every prefix of every gate prefix, and one character changed or
        // added at every place.
        for p in GATE_ONLY {
            for i in 0..=p.len() {
                keys.push(p[..i].to_string());
                for c in ['x', ':', '.', '*', '[', 'q'] {
                    keys.push(format!("{}{c}{}", &p[..i], &p[i..]));
                    if i < p.len() {
                        keys.push(format!("{}{c}{}", &p[..i], &p[i + 1..]));
                    }
                }
            }
        }
        for k in keys.iter().filter(|k| !k.is_empty()) {
            assert_eq!(writable(k), !gate_only(k.as_bytes()), "{k:?} with {pats:?}");
        }
    }

    #[test]
    fn the_shipped_file_is_these_rules_with_no_password() {
        let shipped = include_str!("../../deploy/redis/users.acl");
        let want: Vec<String> = USERS.iter().map(|(u, r)| user_line(u, r, None)).collect();
        assert_eq!(shipped.lines().collect::<Vec<_>>(), want);
        assert!(!shipped.contains('>') && !shipped.contains('#'));
    }

    #[test]
    fn placeholders_are_found_and_lines_carry_no_password() {
        assert!(is_placeholder("CHANGE-ME-p33"));
        assert!(is_placeholder("change_me"));
        assert!(!is_placeholder("a-real-one"));
        let pw = Secret::new("s3cret");
        let line = user_line("p33", P33, Some(&pw));
        assert!(!line.contains("s3cret"));
        assert!(
            line.starts_with(
                "user p33 on #1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0 resetkeys "
            ),
            "{line}"
        );
        assert_eq!(hashed(&pw).len(), 65);
        let pl = pipeline_line("default", None);
        assert!(pl.starts_with("user default on nopass resetkeys"), "{pl}");
        assert!(pl.contains(" -flushall ") && pl.contains(" %R~* "), "{pl}");
    }
}
