//! Secrets and least privilege (SPEC §17): systemd credentials.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// A credentials directory, as systemd would give one (removed on drop).
struct Creds(std::path::PathBuf);

impl Creds {
    fn new(files: &[(&str, &str)]) -> Creds {
        let dir = std::env::temp_dir().join(format!("p33-creds-it-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, value) in files {
            std::fs::write(dir.join(name), value).unwrap();
        }
        Creds(dir)
    }
    fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for Creds {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_daemon_takes_its_secrets_from_systemd_credentials_only() {
    let redis = Redis::start_with(&["--requirepass", "cred-redis-pw"]);
    let fx = FakeExchange::start("cred-api-key", "cred-api-secret");
    let creds = Creds::new(&[
        ("binance_api_key", "cred-api-key\n"),
        ("binance_api_secret", "cred-api-secret\n"),
        ("redis_password", "cred-redis-pw\n"),
    ]);
    fx.control(
        "/control/positions",
        json!([{"symbol": "BTCUSDT", "positionAmt": "0.5"}]),
    );
    let mut env = base_env(&redis);
    for (k, v) in [
        // No password in the URL and none in the environment: the
        // credential is the only source.
        ("REDIS_URL", format!("redis://127.0.0.1:{}/0", redis.port)),
        ("CREDENTIALS_DIRECTORY", creds.path()),
        ("P33_SNAPSHOT_SOURCE", "binance".into()),
        ("P33_EXCHANGE_BASE_URL", fx.url()),
        ("P33_ALLOWLIST_SOURCE", "env".into()),
        ("P33_ALLOWLIST", "BTCUSDT".into()),
        // A wrong key in the environment loses to the credential.
        ("BINANCE_API_KEY", "wrong-env-key".into()),
    ] {
        env.insert(k.to_string(), v);
    }
    let d = Daemon::start(&env);
    d.wait_metric("p33_position_stream_live", 1.0);
    let mut con = redis.con();
    wait_for("a snapshot written with the credentials", T, || {
        redis::cmd("HGET")
            .arg("quantum:position:snapshot:BTCUSDT")
            .arg("position_amt")
            .query::<Option<String>>(&mut con)
            .ok()
            .flatten()
            .filter(|a| a == "0.5")
    });
    let logs = d.grep("").join("\n");
    for secret in ["cred-api-key", "cred-api-secret", "cred-redis-pw"] {
        assert!(!logs.contains(secret), "{secret} in the log");
    }
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_once(&["--check-config"], &pairs);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "BINANCE_TESTNET_API_KEY=[redacted] (from credential binance_api_key)",
        "BINANCE_TESTNET_API_SECRET=[redacted] (from credential binance_api_secret)",
        "REDIS_PASSWORD=[redacted] (from credential redis_password)",
        "BINANCE_API_KEY=(unset)",
    ] {
        assert!(out.contains(line), "{line} in:\n{out}");
    }
    assert!(
        !out.contains("cred-") && !out.contains("wrong-env-key"),
        "{out}"
    );
}

#[test]
fn an_empty_or_unreadable_credential_is_exit_78_naming_it() {
    let redis = Redis::start();
    for (name, make) in [("redis_password", "empty"), ("binance_api_secret", "dir")] {
        let creds = Creds::new(&[]);
        let path = creds.0.join(name);
        if make == "empty" {
            std::fs::write(&path, "").unwrap();
        } else {
            std::fs::create_dir(&path).unwrap();
        }
        let mut env = base_env(&redis);
        env.insert("CREDENTIALS_DIRECTORY".into(), creds.path());
        env.insert("P33_SNAPSHOT_SOURCE".into(), "binance".into());
        env.insert("BINANCE_API_KEY".into(), "k".into());
        env.insert("BINANCE_API_SECRET".into(), "s".into());
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, out, err) = run_once(&[], &pairs);
        assert_eq!(code, Some(78), "{name}: {out}{err}");
        let want = if make == "empty" {
            format!("$CREDENTIALS_DIRECTORY/{name} is empty")
        } else {
            format!("$CREDENTIALS_DIRECTORY/{name} is a directory, not a regular file")
        };
        assert!(err.contains(&want), "{want} in:\n{err}");
    }
}

/// A connection to `redis` as an ACL user.
fn con_as(redis: &Redis, user: &str) -> redis::Connection {
    let url = format!(
        "redis://{user}:{}@127.0.0.1:{}/0",
        acl_password(user),
        redis.port
    );
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// `ACL DRYRUN user args…`: `None` when allowed, else Redis's reason.
fn dryrun(con: &mut redis::Connection, user: &str, args: &[&str]) -> Option<String> {
    let r: String = redis::cmd("ACL")
        .arg("DRYRUN")
        .arg(user)
        .arg(args)
        .query(con)
        .unwrap_or_else(|e| panic!("ACL DRYRUN {user} {args:?}: {e}"));
    (r != "OK").then_some(r)
}

/// Every Redis command the daemon's sources name: `cmd("X")` in Rust,
/// `redis.call('X'` in the scripts, and the builder methods used.
fn commands_in_sources() -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if !p.ends_with("bin") {
                    dirs.push(p);
                }
            } else {
                files.push(p);
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (open, close) in [
            ("cmd(\"", '"'),
            ("redis.call('", '\''),
            ("redis.pcall('", '\''),
        ] {
            for part in text.split(open).skip(1) {
                let name: String = part.chars().take_while(|c| *c != close).collect();
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                    out.insert(name);
                }
            }
        }
        for (method, command) in [
            (".hset_multiple(", "HMSET"),
            (".pexpire(", "PEXPIRE"),
            (".del(", "DEL"),
            (".atomic()", "MULTI"),
        ] {
            if text.contains(method) {
                out.insert(command.to_string());
            }
        }
    }
    out
}

#[test]
fn the_acl_follows_every_command_and_key_the_daemon_uses() {
    let redis = Redis::start_acl();
    let mut admin = redis.con();
    // One example per command, on a key the daemon owns: each must be
    // allowed to p33. A command new in the sources without a row here (and
    // in deploy/redis/users.acl) fails this test.
    let examples: &[(&str, &[&str])] = &[
        ("DEL", &["DEL", "quantum:permit:p33:x"]),
        (
            "EVALSHA",
            &[
                "EVALSHA",
                "0000000000000000000000000000000000000000",
                "1",
                "quantum:p33:allows",
            ],
        ),
        (
            "EVALSHA_RO",
            &[
                "EVALSHA_RO",
                "0000000000000000000000000000000000000000",
                "1",
                "quantum:cfg:universe:active",
            ],
        ),
        ("EXISTS", &["EXISTS", "quantum:permit:p33:x"]),
        (
            "FUNCTION",
            &["FUNCTION", "LOAD", "REPLACE", "#!lua name=x\n"],
        ),
        ("FUNCTION", &["FUNCTION", "LIST", "LIBRARYNAME", "p33_x"]),
        (
            "GETRANGE",
            &["GETRANGE", "quantum:p33:trading_state", "0", "16"],
        ),
        (
            "EXPIRE",
            &["EXPIRE", "quantum:position:snapshot:BTCUSDT", "10"],
        ),
        ("GET", &["GET", "quantum:cooldown:last_exec_ts:BTCUSDT"]),
        ("HGET", &["HGET", "quantum:position:ledger:BTCUSDT", "f"]),
        ("HGETALL", &["HGETALL", "quantum:cfg:universe:meta"]),
        ("HMSET", &["HMSET", "quantum:p33:instance:x", "a", "b"]),
        ("INFO", &["INFO", "replication"]),
        (
            "HSET",
            &["HSET", "quantum:position:snapshot:BTCUSDT", "a", "b"],
        ),
        (
            "HSTRLEN",
            &["HSTRLEN", "quantum:position:ledger:BTCUSDT", "f"],
        ),
        ("MULTI", &["MULTI"]),
        ("PEXPIRE", &["PEXPIRE", "quantum:p33:latch", "10"]),
        ("ROLE", &["ROLE"]),
        ("SCAN", &["SCAN", "0"]),
        ("SCRIPT", &["SCRIPT", "LOAD", "return 1"]),
        ("SET", &["SET", "quantum:permit:p33:x", "v"]),
        ("STRLEN", &["STRLEN", "quantum:reconcile:hold:BTCUSDT"]),
        ("TIME", &["TIME"]),
        ("TYPE", &["TYPE", "quantum:reconcile:hold:BTCUSDT"]),
        ("WAIT", &["WAIT", "0", "0"]),
        ("XACK", &["XACK", "quantum:stream:apply.plan", "p33", "0-1"]),
        (
            "XADD",
            &["XADD", "quantum:stream:p33.decisions", "*", "a", "b"],
        ),
        (
            "XAUTOCLAIM",
            &[
                "XAUTOCLAIM",
                "quantum:stream:apply.plan",
                "p33",
                "c",
                "1000",
                "0",
            ],
        ),
        (
            "XGROUP",
            &[
                "XGROUP",
                "CREATE",
                "quantum:stream:apply.result",
                "p33-ledger",
                "$",
                "MKSTREAM",
            ],
        ),
        ("XINFO", &["XINFO", "STREAM", "quantum:stream:p33.control"]),
        (
            "XRANGE",
            &["XRANGE", "quantum:stream:p33.control", "-", "+"],
        ),
        (
            "XPENDING",
            &["XPENDING", "quantum:stream:apply.plan", "p33"],
        ),
        (
            "XREAD",
            &["XREAD", "STREAMS", "quantum:stream:p33.control", "0"],
        ),
        (
            "XREADGROUP",
            &[
                "XREADGROUP",
                "GROUP",
                "p33",
                "c",
                "STREAMS",
                "quantum:stream:apply.plan",
                ">",
            ],
        ),
        (
            "XREVRANGE",
            &["XREVRANGE", "quantum:stream:p33.decisions", "+", "-"],
        ),
        ("ZADD", &["ZADD", "quantum:p33:opens:1000ms", "1", "m"]),
        ("ZCARD", &["ZCARD", "quantum:p33:open_positions"]),
        (
            "ZRANGE",
            &["ZRANGE", "quantum:p33:open_positions", "0", "-1"],
        ),
        (
            "ZRANGEBYSCORE",
            &["ZRANGEBYSCORE", "quantum:p33:allows", "0", "1"],
        ),
        ("ZREM", &["ZREM", "quantum:p33:allows", "m"]),
        (
            "ZREMRANGEBYSCORE",
            &["ZREMRANGEBYSCORE", "quantum:p33:allows", "0", "1"],
        ),
    ];
    // What ctl's user runs (its change is the daemon's function, SPEC §17)
    // and what the readers run.
    let others: &[(&str, &str, &[&str])] = &[
        (
            "FCALL",
            "p33-ops",
            &[
                "FCALL",
                "p33_change_state_x",
                "3",
                "quantum:p33:trading_state",
                "quantum:stream:p33.control",
                "quantum:p33:latch",
            ],
        ),
        (
            "WATCH",
            "p33-ops",
            &[
                "WATCH",
                "quantum:p33:trading_state",
                "quantum:stream:p33.control",
            ],
        ),
        ("UNWATCH", "p33-ops", &["UNWATCH"]),
        (
            "SET",
            "p33-ops",
            &["SET", "quantum:p33:trading_state", "HALTED"],
        ),
        (
            "XADD",
            "p33-ops",
            &["XADD", "quantum:stream:p33.control", "*", "a", "b"],
        ),
        ("DEL", "p33-ops", &["DEL", "quantum:p33:latch"]),
        ("MULTI", "p33-ops", &["MULTI"]),
        ("MULTI", "p33-read", &["MULTI"]),
        (
            "GETRANGE",
            "p33-read",
            &["GETRANGE", "quantum:p33:trading_state:X", "0", "16"],
        ),
        (
            "GETRANGE",
            "p33-ops",
            &["GETRANGE", "quantum:p33:trading_state", "0", "16"],
        ),
    ];
    let known: std::collections::BTreeSet<&str> = examples
        .iter()
        .map(|(c, _)| *c)
        .chain(others.iter().map(|(c, ..)| *c))
        .collect();
    for c in commands_in_sources() {
        assert!(
            known.contains(c.as_str()),
            "the sources use {c}: allow it to its user in src/operator/acl.rs (deploy/redis/users.acl) and add it here"
        );
    }
    for (c, args) in examples {
        assert_eq!(
            dryrun(&mut admin, "p33", args),
            None,
            "p33 may {c}: {args:?}"
        );
    }
    for (c, user, args) in others {
        assert_eq!(
            dryrun(&mut admin, user, args),
            None,
            "{user} may {c}: {args:?}"
        );
    }
    // What the selectors take away (SPEC §17): no user but the daemon runs
    // code of its own; ctl's user cannot set the latch, nor delete or
    // retype the control stream; the daemon cannot publish a plan.
    let refused: &[(&str, &[&str])] = &[
        ("p33-read", &["EVAL_RO", "while true do end", "0"]),
        (
            "p33-read",
            &[
                "EVALSHA_RO",
                "0000000000000000000000000000000000000000",
                "0",
            ],
        ),
        ("p33-read", &["SCRIPT", "LOAD", "return 1"]),
        ("p33-read", &["FCALL_RO", "f", "0"]),
        ("p33-read", &["FCALL", "f", "0"]),
        ("p33-read", &["FUNCTION", "LOAD", "#!lua name=x\n"]),
        ("p33-ops", &["EVAL", "return 1", "0"]),
        ("p33-ops", &["EVAL_RO", "return 1", "0"]),
        (
            "p33-ops",
            &["EVALSHA", "0000000000000000000000000000000000000000", "0"],
        ),
        ("p33-ops", &["SCRIPT", "LOAD", "return 1"]),
        ("p33-ops", &["FUNCTION", "LOAD", "#!lua name=x\n"]),
        ("p33-ops", &["FUNCTION", "FLUSH"]),
        ("p33-ops", &["SET", "quantum:p33:latch", "1-0"]),
        ("p33-ops", &["DEL", "quantum:stream:p33.control"]),
        ("p33-ops", &["SET", "quantum:stream:p33.control", "x"]),
        (
            "p33-ops",
            &["XADD", "quantum:p33:trading_state", "*", "a", "b"],
        ),
        ("p33-ops", &["SET", "quantum:permit:p33:x", "v"]),
        (
            "p33-ops",
            &[
                "FCALL",
                "f",
                "2",
                "quantum:p33:trading_state",
                "quantum:permit:p33:x",
            ],
        ),
        ("p33", &["XADD", "quantum:stream:apply.plan", "*", "a", "b"]),
        (
            "p33",
            &["XADD", "quantum:stream:apply.result", "*", "a", "b"],
        ),
        ("p33", &["DEL", "quantum:stream:apply.plan"]),
        (
            "p33",
            &["XTRIM", "quantum:stream:apply.plan", "MAXLEN", "0"],
        ),
        ("p33", &["FUNCTION", "FLUSH"]),
    ];
    for (user, args) in refused {
        assert!(
            dryrun(&mut admin, user, args).is_some(),
            "{user} may not {args:?}"
        );
    }
    // Every key family of src/redis/keys.rs, and what each user may do with it.
    let keys_rs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/redis/keys.rs"),
    )
    .unwrap();
    // (example key, p33, p33-ops, p33-read): "rw", "r" or "-".
    let families: &[(&str, &str, &str, &str)] = &[
        // The plans and results: read, and written only by the group
        // commands (the examples above).
        ("quantum:stream:apply.plan", "r", "-", "r"),
        ("quantum:stream:apply.result", "r", "-", "r"),
        ("quantum:cfg:universe:active", "r", "-", "r"),
        ("quantum:cfg:universe:last_ok", "r", "-", "r"),
        ("quantum:cfg:universe:meta", "r", "-", "r"),
        ("quantum:p33:step_sizes", "rw", "r", "r"),
        ("quantum:p33:trading_state", "rw", "rw", "r"),
        ("quantum:p33:trading_state:BTCUSDT", "rw", "rw", "r"),
        ("quantum:p33:opens:60000ms", "rw", "r", "r"),
        ("quantum:p33:opens:60000ms:BTCUSDT", "rw", "r", "r"),
        ("quantum:p33:open_positions", "rw", "r", "r"),
        ("quantum:stream:p33.decisions", "rw", "r", "r"),
        ("quantum:stream:p33.decisions.dry_run", "rw", "r", "r"),
        ("quantum:p33:latch", "rw", "rw", "r"),
        ("quantum:p33:allows", "rw", "r", "r"),
        ("quantum:p33:armed", "rw", "r", "r"),
        ("quantum:p33:allows:opens", "rw", "r", "r"),
        ("quantum:p33:allows:BTCUSDT", "rw", "r", "r"),
        ("quantum:stream:p33.revocations", "rw", "r", "r"),
        ("quantum:stream:p33.positions", "rw", "r", "r"),
        // The pipeline's: p33 only adds to it (below).
        ("quantum:stream:trade.closed", "-", "-", "r"),
        ("quantum:p33:instance:p33-a", "rw", "r", "r"),
        ("quantum:p33:revoked:1-0", "rw", "r", "r"),
        // ctl's user adds to it (XADD, above), never deletes it.
        ("quantum:stream:p33.control", "rw", "r", "r"),
        ("quantum:permit:p33:plan-1", "rw", "-", "r"),
        ("quantum:reconcile:hold:BTCUSDT", "r", "-", "r"),
        ("quantum:position:snapshot:BTCUSDT", "rw", "-", "r"),
        ("quantum:state:positions:BTCUSDT", "rw", "-", "r"),
        ("quantum:position:ledger:BTCUSDT", "rw", "-", "r"),
        ("quantum:cooldown:last_exec_ts:BTCUSDT", "r", "-", "r"),
        ("somebody:else", "-", "-", "-"),
    ];
    // Every "quantum:…" name in keys.rs (its code, not its tests) has a row
    // (by its fixed prefix).
    let code = keys_rs.split("#[cfg(test)]").next().unwrap();
    for part in code.split('"').skip(1).step_by(2) {
        if let Some(name) = part.strip_prefix("quantum:") {
            let prefix = format!("quantum:{}", name.split('{').next().unwrap());
            assert!(
                families.iter().any(|(k, ..)| k.starts_with(&prefix)),
                "src/redis/keys.rs names {prefix}: give it an ACL row here and in deploy/redis/users.acl"
            );
        }
    }
    for (key, p33, ops, read) in families {
        for (user, want) in [("p33", p33), ("p33-ops", ops), ("p33-read", read)] {
            let r = dryrun(&mut admin, user, &["EXISTS", key]).is_none();
            let w = dryrun(&mut admin, user, &["DEL", key]).is_none();
            let got = match (r, w) {
                (true, true) => "rw",
                (true, false) => "r",
                (false, false) => "-",
                (false, true) => "w",
            };
            assert_eq!(got, *want, "{user} on {key}");
        }
    }
    // p33-read only reads; p33-ops changes no permit.
    assert!(dryrun(
        &mut admin,
        "p33-read",
        &[
            "EVALSHA",
            "0000000000000000000000000000000000000000",
            "1",
            "quantum:p33:trading_state"
        ]
    )
    .is_some());
    assert!(dryrun(&mut admin, "p33-ops", &["SET", "quantum:permit:p33:x", "v"]).is_some());
    // p33 adds exchange-side closes to the pipeline's trade.closed stream
    // (SPEC §19), trimmed as its other writers trim it, and may do nothing
    // else there.
    let closed = "quantum:stream:trade.closed";
    assert_eq!(
        dryrun(
            &mut admin,
            "p33",
            &["XADD", closed, "MAXLEN", "~", "2000", "*", "a", "b"]
        ),
        None
    );
    for refused in [
        &["DEL", closed][..],
        &["XTRIM", closed, "MAXLEN", "0"],
        &["XDEL", closed, "1-1"],
        &["SET", closed, "v"],
        &["XRANGE", closed, "-", "+"],
    ] {
        assert!(
            dryrun(&mut admin, "p33", refused).is_some(),
            "p33 may not {refused:?}"
        );
    }
}

#[test]
fn as_p33_the_daemon_permits_and_may_not_write_what_is_not_its_own() {
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT").deferred());
    if !t.redis.has_acl() {
        // Not under P33_IT_ACL: a server of its own with the users.
        t.redis = Redis::start_acl();
        t.con = t.redis.con();
        t.env = {
            let mut e = base_env(&t.redis);
            e.insert("P33_ALLOWLIST_SOURCE".into(), "env".into());
            e.insert("P33_ALLOWLIST".into(), "BTCUSDT".into());
            e
        };
    }
    assert_eq!(t.env["REDIS_USERNAME"], "p33");
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    t.start_ready();
    t.push_plan(&[
        ("plan_id", "acl-1"),
        ("symbol", "BTCUSDT"),
        ("decision", "EXECUTE"),
        ("action", "FULL_CLOSE_PROPOSED"),
        ("reduceOnly", "true"),
    ]);
    assert_eq!(t.wait_permit("acl-1")["allow"], true);
    let mut p33 = con_as(&t.redis, "p33");
    for (key, what) in [
        ("quantum:cfg:universe:active", "the universe"),
        ("quantum:reconcile:hold:BTCUSDT", "a reconcile hold"),
        ("quantum:cooldown:last_exec_ts:BTCUSDT", "a cooldown"),
        ("apply:something:else", "a foreign key"),
    ] {
        let e = redis::cmd("SET")
            .arg(key)
            .arg("x")
            .query::<()>(&mut p33)
            .unwrap_err();
        assert_eq!(e.code(), Some("NOPERM"), "{what}: {e}");
    }
    let e = redis::cmd("FLUSHALL").query::<()>(&mut p33).unwrap_err();
    assert_eq!(e.code(), Some("NOPERM"), "{e}");
    // The read-only user reads the record: explain and replay work as p33-read.
    let read = format!(
        "redis://p33-read:{}@127.0.0.1:{}/0",
        acl_password("p33-read"),
        t.redis.port
    );
    let (code, out, err) = run_once(&["explain", "acl-1"], &[("REDIS_URL", &read)]);
    assert_eq!(code, Some(0), "explain as p33-read: {out}{err}");
    assert!(out.contains("acl-1"), "{out}");
    let (code, out, err) = run_once(&["replay", "--last", "10"], &[("REDIS_URL", &read)]);
    assert_eq!(code, Some(0), "replay as p33-read: {out}{err}");
}

#[test]
fn ctl_changes_need_p33_ops_and_p33_read_is_told_so() {
    let redis = Redis::start_acl();
    let url = |user: &str| {
        format!(
            "redis://{user}:{}@127.0.0.1:{}/0",
            acl_password(user),
            redis.port
        )
    };
    let read = url("p33-read");
    let (code, out, err) = run_once(
        &["ctl", "halt", "--reason", "acl test"],
        &[("REDIS_URL", &read), ("USER", "tester")],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("Redis user p33-read is not allowed to do this")
            && err.contains("nothing was changed")
            && err.contains("p33-ops"),
        "{err}"
    );
    let mut admin = redis.con();
    let state: Option<String> = redis::cmd("GET")
        .arg("quantum:p33:trading_state")
        .query(&mut admin)
        .unwrap();
    assert_eq!(state, None, "nothing was changed");
    let ops = url("p33-ops");
    let (code, out, err) = run_once(
        &["ctl", "halt", "--reason", "acl test"],
        &[("REDIS_URL", &ops), ("USER", "tester")],
    );
    // Written, and said where; no gate runs on this Redis: exit 3 (SPEC §12).
    let at = format!("127.0.0.1:{}/0", redis.port);
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(
        out.contains(&format!("redis: {at} (master, user p33-ops)")),
        "{out}"
    );
    assert!(
        out.contains(&format!("WARNING: no running gate reads {at}")),
        "{out}"
    );
    assert!(
        !out.contains(&acl_password("p33-ops")),
        "no password: {out}"
    );
    for u in [&ops, &read] {
        let (code, out, err) = run_once(&["ctl", "status"], &[("REDIS_URL", u)]);
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("HALTED"), "{out}");
    }
}

#[test]
fn a_noperm_at_start_is_exit_78_naming_the_command_and_key() {
    let redis = Redis::start_acl();
    let mut admin = redis.con();
    // p33's rights without the plan stream.
    let acl = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/redis/users.acl"),
    )
    .unwrap();
    let p33 = acl.lines().find(|l| l.starts_with("user p33 ")).unwrap();
    // The root rules (no selector), without the plan stream.
    let root = p33.split('(').next().unwrap();
    let rules: Vec<&str> = root
        .split_whitespace()
        .skip(2)
        .filter(|r| !r.ends_with("~quantum:stream:apply.plan"))
        .collect();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("p33-weak")
        .arg(">weak-pw")
        .arg(&rules)
        .query(&mut admin)
        .unwrap();
    let mut env = base_env(&redis);
    env.insert("REDIS_USERNAME".into(), "p33-weak".into());
    env.insert("REDIS_PASSWORD".into(), "weak-pw".into());
    env.insert("P33_ALLOWLIST".into(), "BTCUSDT".into());
    let t0 = std::time::Instant::now();
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_once(&[], &pairs);
    assert_eq!(code, Some(78), "{out}{err}");
    assert!(t0.elapsed() < T, "no retry loop: {:?}", t0.elapsed());
    let all = format!("{out}{err}");
    assert!(
        all.contains("user p33-weak may not XGROUP CREATE quantum:stream:apply.plan p33"),
        "{all}"
    );
    assert!(!all.contains("weak-pw"), "{all}");
}

/// A test CA and a server certificate for 127.0.0.1 (openssl), in `dir`.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=p33-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

/// A TLS connection (the test CA) to 127.0.0.1:`port`.
fn tls_con(dir: &std::path::Path, port: u16) -> Option<redis::Connection> {
    let info = redis::ConnectionInfo {
        addr: redis::ConnectionAddr::TcpTls {
            host: "127.0.0.1".into(),
            port,
            insecure: false,
            tls_params: None,
        },
        redis: redis::RedisConnectionInfo::default(),
    };
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(dir.join("ca.crt")).unwrap()),
    };
    redis::Client::build_with_tls(info, certs)
        .ok()?
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()
}

struct Procs(Vec<std::process::Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn with_redis_tls_the_daemon_reaches_sentinels_and_nodes_over_tls_only() {
    let dir = std::env::temp_dir().join(format!("p33-tls-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let tls_args = |port: u16| {
        let mut a: Vec<String> = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
        ];
        for (k, v) in [
            ("--bind", "127.0.0.1".to_string()),
            ("--tls-cert-file", d("server.crt")),
            ("--tls-key-file", d("server.key")),
            ("--tls-ca-cert-file", d("ca.crt")),
            ("--tls-auth-clients", "no".into()),
            ("--tls-replication", "yes".into()),
            ("--save", "".into()),
        ] {
            a.push(k.into());
            a.push(v);
        }
        a
    };
    let mut procs = Procs(Vec::new());
    let (m, r) = (free_port(), free_port());
    let spawn = |args: Vec<String>, wd: &str| {
        let wd = dir.join(wd);
        std::fs::create_dir_all(&wd).unwrap();
        std::process::Command::new("redis-server")
            .args(args)
            .current_dir(&wd)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    procs.0.push(spawn(tls_args(m), "m"));
    let mut replica = tls_args(r);
    replica.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
    procs.0.push(spawn(replica, "r"));
    let mut sentinels = Vec::new();
    for i in 0..3 {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor p33tls 127.0.0.1 {m} 2\nsentinel down-after-milliseconds p33tls 1000\n\
                 sentinel failover-timeout p33tls 10000\n",
                dir.display(),
                d("server.crt"),
                d("server.key"),
                d("ca.crt")
            ),
        )
        .unwrap();
        procs.0.push(spawn(
            vec![conf.to_string_lossy().into_owned(), "--sentinel".into()],
            "s",
        ));
        sentinels.push(port);
    }
    let mut master = wait_for("the TLS master", T, || tls_con(&dir, m));
    // Plain TCP gets no answer on a TLS port: nothing but TLS reaches it.
    assert!(redis::Client::open(format!("redis://127.0.0.1:{m}/0"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(1))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_err());
    set_snapshot(&mut master, "BTCUSDT", "1", now());
    let mut env = std::collections::HashMap::new();
    let list: Vec<String> = sentinels.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for (k, v) in [
        ("REDIS_SENTINELS", list.join(",")),
        ("REDIS_SENTINEL_MASTER", "p33tls".into()),
        ("REDIS_TLS", "true".into()),
        ("REDIS_TLS_CA_FILE", d("ca.crt")),
        ("P33_METRICS_ADDR", "127.0.0.1".into()),
        ("P33_METRICS_PORT", "0".into()),
        ("P33_SNAPSHOT_SOURCE", "external".into()),
        ("P33_ALLOWLIST_SOURCE", "env".into()),
        ("P33_ALLOWLIST", "BTCUSDT".into()),
        ("P33_CONSUMER_NAME", "p33-tls".into()),
        ("P33_LOG_LEVEL", "INFO".into()),
    ] {
        env.insert(k.to_string(), v);
    }
    let daemon = Daemon::start(&env);
    daemon.wait_log("ready: reading plans", T);
    push_plan(
        &mut master,
        &[
            ("plan_id", "tls-1"),
            ("symbol", "BTCUSDT"),
            ("decision", "EXECUTE"),
            ("action", "FULL_CLOSE_PROPOSED"),
            ("reduceOnly", "true"),
        ],
    );
    assert_eq!(wait_permit(&mut master, "tls-1")["allow"], true);
    assert_eq!(daemon.metric("p33_redis_master_known"), Some(1.0));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_once(&["--check-config"], &pairs);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("REDIS_TLS=true"), "{out}");
    // A CA file that is no certificate is a configuration error.
    std::fs::write(dir.join("bad.crt"), "not a certificate").unwrap();
    let mut bad = pairs.clone();
    let bad_path = d("bad.crt");
    bad.retain(|(k, _)| *k != "REDIS_TLS_CA_FILE");
    bad.push(("REDIS_TLS_CA_FILE", &bad_path));
    let (code, _, err) = run_once(&["--check-config"], &bad);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("REDIS_TLS_CA_FILE") && err.contains("holds no PEM certificate"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 28 item 1 (SPEC §12): an on-call user in group p33-ops runs `ctl`
/// with no sudo and no secret in the shell. `ctl` reads the Redis settings
/// of the ctl env file (only REDIS_* names; others are ignored, said) and
/// the password from the file REDIS_PASSWORD_FILE names; a password file
/// that cannot be read is exit 78 naming it, never a silent localhost.
#[test]
fn an_on_call_in_p33_ops_needs_no_secret_in_the_shell() {
    let redis = Redis::start_acl();
    let dir =
        std::env::temp_dir().join(format!("p33-oncall-{}-{}", redis.port, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pw = dir.join("ops.pw");
    std::fs::write(&pw, format!("{}\n", acl_password("p33-ops"))).unwrap();
    let ctl_env = dir.join("position-state-brain-ctl.env");
    std::fs::write(
        &ctl_env,
        format!(
            "# the on-call's Redis settings\nREDIS_URL=redis://127.0.0.1:{}/0\nREDIS_USERNAME=\"p33-ops\"\nREDIS_PASSWORD_FILE={}\nBINANCE_API_KEY=not-read\n",
            redis.port,
            pw.display()
        ),
    )
    .unwrap();
    let file = ctl_env.to_string_lossy().into_owned();
    let (code, out, err) = run_once(
        &["ctl", "halt", "--reason", "from the ctl env"],
        &[("P33_CTL_ENV_FILE", &file), ("USER", "oncall")],
    );
    assert_eq!(code, Some(3), "written, no gate runs here: {out}{err}");
    assert!(out.contains("(master, user p33-ops)"), "{out}");
    assert!(err.contains("ignored: BINANCE_API_KEY"), "{err}");
    assert!(!out.contains(&acl_password("p33-ops")) && !err.contains(&acl_password("p33-ops")));
    let mut admin = redis.con();
    let state: Option<String> = redis::cmd("GET")
        .arg("quantum:p33:trading_state")
        .query(&mut admin)
        .unwrap();
    assert_eq!(state.as_deref(), Some("HALTED"));
    // --check-config reads the same (the exchange not needed: external).
    let (code, out, err) = run_once(
        &["--check-config"],
        &[
            ("P33_CTL_ENV_FILE", &file),
            ("P33_SNAPSHOT_SOURCE", "external"),
            ("P33_METRICS_ADDR", "127.0.0.1"),
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("p33-ops"), "{out}");
    assert!(out.contains("REDIS_PASSWORD_FILE"), "{out}");
    assert!(!out.contains(&acl_password("p33-ops")), "{out}");
    // The environment wins over the file; a password file that is not there
    // is a configuration error naming it.
    let (code, _, err) = run_once(
        &["ctl", "status"],
        &[
            ("P33_CTL_ENV_FILE", &file),
            ("REDIS_PASSWORD_FILE", "/nonexistent/pw"),
        ],
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("REDIS_PASSWORD_FILE") && err.contains("/nonexistent/pw"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `ctl` as p33-ops against `redis` (exit code, stdout, stderr).
fn ctl_as_ops(redis: &Redis, args: &[&str]) -> (Option<i32>, String, String) {
    let url = format!(
        "redis://p33-ops:{}@127.0.0.1:{}/0",
        acl_password("p33-ops"),
        redis.port
    );
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    run_once(&all, &[("REDIS_URL", &url), ("USER", "oncall")])
}

#[test]
fn ctl_halts_a_redis_without_the_library_and_a_gate_installs_it() {
    // SPEC §17: p33-ops runs only the daemon's function; a Redis that lost
    // its data (here: that never had a gate) still takes a halt.
    let redis = Redis::start_acl();
    let mut admin = redis.con();
    let state = |admin: &mut redis::Connection| -> Option<String> {
        redis::cmd("GET")
            .arg("quantum:p33:trading_state")
            .query(admin)
            .unwrap()
    };
    let (code, out, err) = ctl_as_ops(&redis, &["halt", "--reason", "no gate yet"]);
    assert_eq!(code, Some(3), "written, no gate reads it: {out}{err}");
    assert!(out.contains("global ACTIVE -> HALTED"), "{out}");
    assert!(
        out.contains("the halt was written with plain commands"),
        "{out}"
    );
    assert_eq!(state(&mut admin).as_deref(), Some("HALTED"));
    let entries: redis::Value = redis::cmd("XRANGE")
        .arg("quantum:stream:p33.control")
        .arg("-")
        .arg("+")
        .query(&mut admin)
        .unwrap();
    let text = format!("{entries:?}");
    for f in [
        "kind",
        "change",
        "no gate yet",
        "oncall@",
        "HALTED",
        "ACTIVE",
    ] {
        assert!(text.contains(f), "{f} in {text}");
    }
    // Anything but a halt needs the library: refused, nothing changed.
    for verb in ["resume", "reduce"] {
        let (code, out, err) = ctl_as_ops(&redis, &[verb, "--reason", "too early"]);
        assert_eq!(code, Some(1), "{verb}: {out}{err}");
        assert!(
            err.contains("has no function p33_change_state_")
                && err.contains("nothing was changed"),
            "{err}"
        );
        assert_eq!(state(&mut admin).as_deref(), Some("HALTED"));
    }
    // A gate (as p33) installs it on its first pass; resume then works.
    let mut env = base_env(&redis);
    env.insert("REDIS_USERNAME".into(), "p33".into());
    env.insert("REDIS_PASSWORD".into(), acl_password("p33"));
    env.insert("P33_ALLOWLIST_SOURCE".into(), "env".into());
    env.insert("P33_ALLOWLIST".into(), "BTCUSDT".into());
    let d = Daemon::start(&env);
    d.wait_log("installed the function library p33_", T);
    let (code, out, err) = ctl_as_ops(&redis, &["resume", "--reason", "gate is up"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("global HALTED -> ACTIVE"), "{out}");
    assert!(!out.contains("plain commands"), "{out}");
    assert_eq!(state(&mut admin).as_deref(), Some("ACTIVE"));
    // An admin's FUNCTION FLUSH (or a restart without persistence): the
    // gate puts it back within a pass.
    let from = d.log_count();
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut admin)
        .unwrap();
    d.wait_log_after(from, "installed the function library p33_", T);
    let (code, out, err) = ctl_as_ops(&redis, &["reduce", "--reason", "library back"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(state(&mut admin).as_deref(), Some("REDUCING"));
}

#[test]
fn the_pipelines_users_write_anything_but_the_gates_keys() {
    // SPEC §17: `acl --pipeline` gives the other services every key but
    // ours; the intent bridge's own auto-permit is refused (NOPERM) while
    // its plan goes through and the gate's verdict is the only permit.
    let mut t = spawn_daemon(Opts::env_allowlist("BTCUSDT").deferred());
    if !t.redis.has_acl() {
        t.redis = Redis::start_acl();
        t.con = t.redis.con();
        t.env = {
            let mut e = base_env(&t.redis);
            e.insert("P33_ALLOWLIST_SOURCE".into(), "env".into());
            e.insert("P33_ALLOWLIST".into(), "BTCUSDT".into());
            e
        };
    }
    let creds = Creds::new(&[("pipe.password", "pipe-pw\n")]);
    let file = format!("pipe={}/pipe.password", creds.path());
    let (code, out, err) = run_once(
        &["acl", "--pipeline", "pipe", "--password-file", &file],
        &[],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!out.contains("pipe-pw"), "{out}");
    // Taking ACL from a user is said, with the way to keep an admin.
    assert!(
        err.contains("no longer run ACL") && err.contains("~* &* +@all"),
        "{err}"
    );
    let line = out.trim();
    assert!(line.starts_with("user pipe on #"), "{line}");
    let rules: Vec<&str> = line.split_whitespace().skip(2).collect();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("pipe")
        .arg(&rules)
        .query(&mut t.con)
        .unwrap();
    // Exact: every key of ours refused for writing, every other key
    // allowed; every key readable.
    let ours = [
        "quantum:permit:p33:plan-1",
        "quantum:permit:p33:",
        "quantum:p33:trading_state",
        "quantum:p33:trading_state:BTCUSDT",
        "quantum:p33:latch",
        "quantum:p33:armed",
        "quantum:stream:p33.control",
        "quantum:stream:p33.decisions",
    ];
    let theirs = [
        "quantum:permit:p3",
        "quantum:permit:p34:x",
        "quantum:permit:p33",
        "quantum:permit:governor:x",
        "quantum:p33",
        "quantum:p34:x",
        "quantum:stream:p33",
        "quantum:stream:p33-x",
        "quantum:stream:apply.plan",
        "quantum:state:positions:BTCUSDT",
        "quantum:position:snapshot:BTCUSDT",
        "quantum:",
        "quantum",
        "q",
        "x",
        "Quantum:p33:latch",
    ];
    for k in ours {
        for args in [
            vec!["SET", k, "v"],
            vec!["HSET", k, "allow", "true"],
            vec!["DEL", k],
            vec!["EXPIRE", k, "10"],
            vec!["XADD", k, "*", "a", "b"],
            vec!["RENAME", "quantum:x", k],
        ] {
            assert!(
                dryrun(&mut t.con, "pipe", &args).is_some(),
                "pipe may not {args:?}"
            );
        }
        assert_eq!(
            dryrun(&mut t.con, "pipe", &["GET", k]),
            None,
            "pipe reads {k}"
        );
    }
    for k in theirs {
        assert_eq!(
            dryrun(&mut t.con, "pipe", &["SET", k, "v"]),
            None,
            "pipe writes {k}"
        );
        assert_eq!(
            dryrun(&mut t.con, "pipe", &["HSET", k, "a", "b"]),
            None,
            "pipe writes {k}"
        );
    }
    for args in [
        vec!["FLUSHALL"],
        vec!["FLUSHDB"],
        vec!["SWAPDB", "0", "1"],
        vec!["ACL", "SETUSER", "pipe", "~*"],
        vec!["CONFIG", "SET", "save", ""],
        vec!["FUNCTION", "FLUSH"],
    ] {
        assert!(
            dryrun(&mut t.con, "pipe", &args).is_some(),
            "pipe may not {args:?}"
        );
    }
    // What the HEAD intent bridge does after each plan (XADD, then HSET
    // allow=true at our permit key and EXPIRE it), as the pipeline's user.
    set_snapshot(&mut t.con, "BTCUSDT", "1", now());
    let _: () = redis::cmd("SET")
        .arg("quantum:p33:trading_state")
        .arg("HALTED")
        .query(&mut t.con)
        .unwrap();
    t.start_ready();
    let mut pipe =
        redis::Client::open(format!("redis://pipe:pipe-pw@127.0.0.1:{}/0", t.redis.port))
            .unwrap()
            .get_connection()
            .unwrap();
    for i in 0..5 {
        let id = format!("bridge-{i}");
        let _: String = redis::cmd("XADD")
            .arg("quantum:stream:apply.plan")
            .arg("*")
            .arg(&[
                ("plan_id", id.as_str()),
                ("symbol", "BTCUSDT"),
                ("decision", "EXECUTE"),
                ("action", "FULL_CLOSE_PROPOSED"),
                ("reduceOnly", "true"),
                ("side", "SELL"),
                ("qty", "1"),
            ])
            .query(&mut pipe)
            .unwrap();
        let key = format!("quantum:permit:p33:{id}");
        let e = redis::cmd("HSET")
            .arg(&key)
            .arg(&[
                ("allow", "true"),
                ("safe_qty", "0"),
                ("reason", "auto_bypass_no_p33"),
            ])
            .query::<i64>(&mut pipe)
            .unwrap_err();
        assert_eq!(e.code(), Some("NOPERM"), "{e}");
        let e = redis::cmd("EXPIRE")
            .arg(&key)
            .arg(86400)
            .query::<i64>(&mut pipe)
            .unwrap_err();
        assert_eq!(e.code(), Some("NOPERM"), "{e}");
        // The one permit is the gate's verdict (a JSON string).
        let p = t.wait_permit(&id);
        assert_eq!(p["allow"], false, "{p}");
        assert_eq!(p["reason"], "trading_halted", "{p}");
        let seen: serde_json::Value = {
            let raw: String = redis::cmd("GET").arg(&key).query(&mut pipe).unwrap();
            serde_json::from_str(&raw).unwrap()
        };
        assert_eq!(seen, p, "the pipeline reads the verdict");
    }
}

#[test]
fn acl_prints_hashed_passwords_that_redis_accepts_and_refuses_placeholders() {
    let creds = Creds::new(&[
        ("p33", "pw-daemon\n"),
        ("ops", "pw-ops"),
        ("read", "pw-read\n"),
        ("placeholder", "CHANGE-ME-p33\n"),
        ("blank", "pw-read \n"),
    ]);
    let f = |u: &str, name: &str| format!("{u}={}/{name}", creds.path());
    let (code, out, err) = run_once(
        &[
            "acl",
            "--password-file",
            &f("p33", "p33"),
            "--password-file",
            &f("p33-ops", "ops"),
            "--password-file",
            &f("p33-read", "read"),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    for pw in ["pw-daemon", "pw-ops", "pw-read"] {
        assert!(!out.contains(pw) && !err.contains(pw), "{pw} printed");
    }
    assert_eq!(out.lines().count(), 3, "{out}");
    // Redis loads the file, and each user logs in with its password.
    let dir = std::env::temp_dir().join(format!("p33-aclcmd-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("users.acl"), &out).unwrap();
    let redis = Redis::start_with(&["--aclfile", &dir.join("users.acl").to_string_lossy()]);
    for (user, pw) in [
        ("p33", "pw-daemon"),
        ("p33-ops", "pw-ops"),
        ("p33-read", "pw-read"),
    ] {
        let mut c = redis::Client::open(format!("redis://{user}:{pw}@127.0.0.1:{}/0", redis.port))
            .unwrap()
            .get_connection()
            .unwrap();
        let pong: String = redis::cmd("PING").query(&mut c).unwrap();
        assert_eq!(pong, "PONG");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // A placeholder, or a blank around the password: exit 78 naming the
    // file, never the value.
    for (name, want) in [
        ("placeholder", "shipped placeholder"),
        ("blank", "whitespace"),
    ] {
        let (code, out, err) = run_once(&["acl", "--password-file", &f("p33", name)], &[]);
        assert_eq!(code, Some(78), "{name}: {out}{err}");
        assert!(err.contains(want) && err.contains(name), "{err}");
        assert!(
            !err.contains("pw-read") && !err.contains("CHANGE-ME-p33\n"),
            "{err}"
        );
    }
}

#[test]
fn a_fifo_is_refused_at_once_never_waited_on() {
    // SPEC §17: a FIFO as a password file or as the CA file was a hang for
    // ever; it is exit 78 naming it.
    let redis = Redis::start();
    let dir = std::env::temp_dir().join(format!("p33-fifo-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("pw");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let fifo = fifo.to_string_lossy().into_owned();
    let url = redis.url();
    for (args, env) in [
        (
            vec!["ctl", "status"],
            vec![
                ("REDIS_URL", url.as_str()),
                ("REDIS_PASSWORD_FILE", fifo.as_str()),
            ],
        ),
        (
            vec!["ctl", "halt", "--reason", "x"],
            vec![
                ("REDIS_URL", url.as_str()),
                ("REDIS_PASSWORD_FILE", fifo.as_str()),
            ],
        ),
        (
            vec!["--check-config"],
            vec![
                ("REDIS_URL", url.as_str()),
                ("REDIS_TLS", "true"),
                ("REDIS_TLS_CA_FILE", fifo.as_str()),
            ],
        ),
        (
            vec!["acl", "--password-file", &format!("p33={fifo}")],
            vec![],
        ),
    ] {
        let t0 = std::time::Instant::now();
        let (code, out, err) = run_once(&args, &env);
        assert_eq!(code, Some(78), "{args:?}: {out}{err}");
        assert!(
            err.contains("is a FIFO, not a regular file"),
            "{args:?}: {err}"
        );
        assert!(t0.elapsed() < T, "{args:?} waited {:?}", t0.elapsed());
    }
    let mut creds = base_env(&redis);
    creds.insert(
        "CREDENTIALS_DIRECTORY".into(),
        dir.to_string_lossy().into_owned(),
    );
    std::fs::rename(dir.join("pw"), dir.join("redis_password")).unwrap();
    let pairs: Vec<(&str, &str)> = creds
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, _, err) = run_once(&[], &pairs);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("redis_password is a FIFO"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_url_credential_reaches_check_config_or_a_log_line() {
    // SPEC §17: a user:password@ in the exchange URLs is redacted wherever
    // it would be printed.
    let redis = Redis::start();
    let mut env = base_env(&redis);
    env.insert(
        "P33_EXCHANGE_BASE_URL".into(),
        "http://u:pw-base@127.0.0.1:9".into(),
    );
    env.insert(
        "P33_EXCHANGE_WS_URL".into(),
        "ws://u:pw-ws@127.0.0.1:9".into(),
    );
    env.insert("P33_ALLOWLIST".into(), "BTCUSDT".into());
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_once(&["--check-config"], &pairs);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("P33_EXCHANGE_BASE_URL=http://[redacted]@127.0.0.1:9"),
        "{out}"
    );
    assert!(!format!("{out}{err}").contains("pw-"), "{out}{err}");
    // The step-size table's WARN names the URL it could not reach.
    let d = Daemon::start(&env);
    let line = d.wait_log("step sizes: GET ", T);
    assert!(
        line.contains("http://[redacted]@127.0.0.1:9/fapi/v1/exchangeInfo"),
        "{line}"
    );
    assert!(!d.grep("pw-").iter().any(|_| true), "{:?}", d.grep("pw-"));
}
