//! Unit tests of `config`.

use super::credentials::{credentials_from, CredentialSource};
use super::values::{parse_value, redact_url};
use super::*;

#[test]
fn the_ctl_env_file_gives_redis_settings_only() {
    let (pairs, ignored) = parse_ctl_env(
            "# on call\n\nREDIS_URL=redis://h:1/0\nexport REDIS_USERNAME=\"p33-ops\"\nREDIS_PASSWORD_FILE='/etc/credstore/p'\nBINANCE_API_SECRET=x\nP33_DRY_RUN=true\nnot a line\n",
        );
    assert_eq!(
        pairs,
        vec![
            ("REDIS_URL".to_string(), "redis://h:1/0".to_string()),
            ("REDIS_USERNAME".to_string(), "p33-ops".to_string()),
            (
                "REDIS_PASSWORD_FILE".to_string(),
                "/etc/credstore/p".to_string()
            ),
        ]
    );
    assert_eq!(ignored, vec!["BINANCE_API_SECRET", "P33_DRY_RUN"]);
}

fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let mut v: Vec<(String, String)> = vec![("P33_SNAPSHOT_SOURCE".into(), "external".into())];
    v.extend(pairs.iter().map(|(k, x)| (k.to_string(), x.to_string())));
    Config::from_pairs(v)
}

#[test]
fn systemd_credentials_win_over_the_environment_and_say_where_they_came_from() {
    let dir = std::env::temp_dir().join(format!("p33-creds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("binance_api_key"), "cred-key\n").unwrap();
    std::fs::write(dir.join("binance_api_secret"), "cred-secret").unwrap();
    std::fs::write(dir.join("redis_password"), "cred-redis\r\n").unwrap();
    let d = dir.to_string_lossy().into_owned();
    let pairs = |extra: &[(&str, &str)]| {
        let mut v: Vec<(String, String)> = vec![
            ("CREDENTIALS_DIRECTORY".into(), d.clone()),
            ("BINANCE_API_KEY".into(), "env-key".into()),
            ("BINANCE_TESTNET_API_SECRET".into(), "env-secret".into()),
        ];
        v.extend(extra.iter().map(|(k, x)| (k.to_string(), x.to_string())));
        v
    };
    let c = Config::from_pairs(pairs(&[])).unwrap();
    assert_eq!(c.binance_api_key.as_ref().unwrap().expose(), "cred-key");
    assert_eq!(
        c.binance_api_secret.as_ref().unwrap().expose(),
        "cred-secret"
    );
    assert!(!c.both_key_kinds, "the credential replaced both key names");
    let shown: HashMap<&str, &str> = c
        .effective()
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    assert_eq!(
        shown["BINANCE_TESTNET_API_KEY"],
        "[redacted] (from credential binance_api_key)"
    );
    assert_eq!(
        shown["REDIS_PASSWORD"],
        "[redacted] (from credential redis_password)"
    );
    assert_eq!(shown["REDIS_SENTINEL_PASSWORD"], "(unset)");
    assert_eq!(shown["BINANCE_API_KEY"], "(unset)");
    let text = format!("{c:?}{:?}", c.effective());
    for secret in ["cred-key", "cred-secret", "cred-redis", "env-key"] {
        assert!(!text.contains(secret), "{secret} shown");
    }
    // Empty, unreadable: exit 78 naming the file, never the value.
    std::fs::write(dir.join("redis_password"), "\n").unwrap();
    let e = Config::from_pairs(pairs(&[])).unwrap_err().to_string();
    assert!(e.contains("redis_password is empty"), "{e}");
    std::fs::remove_file(dir.join("redis_password")).unwrap();
    std::fs::create_dir(dir.join("redis_password")).unwrap();
    let e = Config::from_pairs(pairs(&[])).unwrap_err().to_string();
    assert!(
        e.contains("redis_password is a directory, not a regular file"),
        "{e}"
    );
    std::fs::remove_dir(dir.join("redis_password")).unwrap();
    // A FIFO is refused at once, never waited on (no writer ever comes).
    let fifo = dir.join("redis_password");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = Config::from_pairs(pairs(&[])).unwrap_err().to_string();
    assert!(
        e.contains("redis_password is a FIFO, not a regular file"),
        "{e}"
    );
    std::fs::remove_file(&fifo).unwrap();
    // One trailing newline is dropped; any other blank around it is an
    // error naming the file, never the value.
    for (body, ok) in [
        ("pw-x\n", true),
        ("pw-x\r\n", true),
        ("pw-x", true),
        ("pw-x ", false),
        (" pw-x", false),
        ("pw-x\t\n", false),
        ("pw-x\n\n", false),
    ] {
        std::fs::write(dir.join("redis_password"), body).unwrap();
        match Config::from_pairs(pairs(&[])) {
            Ok(c) => {
                assert!(ok, "{body:?} accepted");
                assert_eq!(c.redis.info.redis.password.as_deref(), Some("pw-x"));
            }
            Err(e) => {
                let e = e.to_string();
                assert!(!ok, "{body:?}: {e}");
                assert!(e.contains("redis_password has whitespace"), "{e}");
                assert!(!e.contains("pw-x"), "{e}");
            }
        }
    }
    std::fs::remove_file(dir.join("redis_password")).unwrap();
    // The tools ignore the exchange's credentials, broken or not.
    std::fs::write(dir.join("binance_api_key"), "").unwrap();
    assert!(Config::from_pairs(pairs(&[])).is_err());
    assert!(Config::from_pairs_for(pairs(&[]), Purpose::Tools).is_ok());
    // Absent files leave the environment's values.
    std::fs::remove_file(dir.join("binance_api_key")).unwrap();
    let c = Config::from_pairs(pairs(&[])).unwrap();
    assert_eq!(c.binance_api_key.as_ref().unwrap().expose(), "env-key");
    let shown: HashMap<&str, &str> = c
        .effective()
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    assert_eq!(
        shown["BINANCE_API_KEY"],
        "[redacted] (from the environment)"
    );
    // A credentials directory that is not there: exit 78.
    let e = Config::from_pairs(vec![(
        "CREDENTIALS_DIRECTORY".to_string(),
        dir.join("missing").to_string_lossy().into_owned(),
    )])
    .unwrap_err()
    .to_string();
    assert!(e.contains("CREDENTIALS_DIRECTORY"), "{e}");
    assert!(e.contains("is not a directory"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_stream_url_follows_the_rest_url_unless_set() {
    for (base, want) in [
        (
            "https://fapi.binance.com",
            Some("wss://fstream.binance.com"),
        ),
        (
            "https://testnet.binancefuture.com",
            Some("wss://stream.binancefuture.com"),
        ),
        (
            "https://demo-fapi.binance.com",
            Some("wss://demo-fstream.binance.com"),
        ),
        ("http://127.0.0.1:8080", Some("ws://127.0.0.1:8080")),
        (
            "https://proxy.example:8443/api",
            Some("wss://proxy.example:8443"),
        ),
        ("http://[::1]:9", Some("ws://[::1]:9")),
        ("ftp://x", None),
    ] {
        assert_eq!(derive_ws_url(base).as_deref(), want, "{base}");
    }
    let binance = |extra: &[(&str, &str)]| {
        let mut v: Vec<(String, String)> = vec![
            ("BINANCE_API_KEY".into(), "k".into()),
            ("BINANCE_API_SECRET".into(), "s".into()),
        ];
        v.extend(extra.iter().map(|(k, x)| (k.to_string(), x.to_string())));
        Config::from_pairs(v)
    };
    let c = binance(&[("P33_EXCHANGE_BASE_URL", "http://127.0.0.1:9")]).unwrap();
    assert_eq!(c.exchange_ws_url, "ws://127.0.0.1:9");
    assert!(c.position_stream);
    let c = binance(&[
        ("P33_EXCHANGE_WS_URL", "wss://elsewhere/"),
        ("P33_POSITION_STREAM", "OFF"),
    ])
    .unwrap();
    assert_eq!(
        (c.exchange_ws_url.as_str(), c.position_stream),
        ("wss://elsewhere", false)
    );
    // External mode never streams.
    assert!(!cfg(&[]).unwrap().position_stream);
    for bad in ["http://x", "wss://", "nonsense"] {
        let e = binance(&[("P33_EXCHANGE_WS_URL", bad)]).unwrap_err();
        assert!(e.to_string().contains("P33_EXCHANGE_WS_URL"), "{bad}: {e}");
    }
}

#[test]
fn defaults_match_the_spec_table() {
    let c = cfg(&[]).expect("defaults are valid");
    assert_eq!(c.redis.display(), "redis://localhost:6379/0");
    assert_eq!(c.universe_key_active, keys::UNIVERSE_ACTIVE);
    assert_eq!(c.universe_key_last_ok, keys::UNIVERSE_LAST_OK);
    assert_eq!(c.universe_key_meta, keys::UNIVERSE_META);
    assert_eq!(c.universe_max_age_s, 300.0);
    assert_eq!(c.allowlist_refresh, Duration::from_secs(60));
    assert_eq!(c.poll_interval, Duration::from_secs(5));
    assert_eq!(c.stale_threshold_s, 10.0);
    assert_eq!(c.cooldown_s, 15.0);
    assert_eq!(c.qty_tolerance_pct, 1.0);
    assert_eq!(c.permit_ttl, Duration::from_secs(60));
    assert_eq!(c.plan_max_age_s, 60.0);
    assert_eq!(c.metrics_port, 8045);
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0");
    assert_eq!(c.log_filter, "info");
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(!c.dry_run);
    assert_eq!(c.consumer_group, "p33");
    assert!(c.consumer_name.starts_with("p33-"));
    assert_eq!(c.claim_idle, Duration::from_secs(30));
    assert!(!c.canonical_positions);
    assert!(c.allowlist_env.is_empty(), "no hard-coded symbol");
    assert_eq!(c.allowlist_mode, AllowlistMode::Universe);
    assert_eq!(c.exchange_base_url, "https://testnet.binancefuture.com");
}

#[test]
fn the_table_is_the_one_list_of_names_and_every_default_parses() {
    let mut names = std::collections::HashSet::new();
    for v in VARS {
        assert!(names.insert(v.name), "{} twice", v.name);
        if let Some(d) = v.default {
            assert!(parse_value(v.kind, d).is_ok(), "default of {}", v.name);
        }
        assert!(!v.doc.is_empty(), "{} has a doc", v.name);
    }
    let c = cfg(&[]).unwrap();
    let shown: Vec<&str> = c.effective().iter().map(|(k, _)| *k).collect();
    for v in VARS {
        assert!(shown.contains(&v.name), "--check-config shows {}", v.name);
    }
}

#[test]
fn one_error_per_bad_variable_and_no_follow_on() {
    // A misspelt mode is one error, not also "credentials missing".
    let e = Config::from_pairs([("P33_SNAPSHOT_SOURCE".to_string(), "extrenal".to_string())])
        .unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].var, "P33_SNAPSHOT_SOURCE");
    // A bad TTL is one error, not also "at least 0.001".
    let e = cfg(&[("P33_PERMIT_TTL", "-1")]).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
}

#[test]
fn warnings_name_every_dropped_entry_and_why() {
    let c = cfg(&[
        ("P33_ALLOWLIST", "btcusdt,ETHUSDT,BTC-USDT"),
        ("P33_POLL_SECS", "3"),
    ])
    .unwrap();
    let w = c.warnings().join("\n");
    assert!(w.contains("\"btcusdt\" will be dropped: lower case"), "{w}");
    assert!(
        w.contains("\"BTC-USDT\" will be dropped: holds characters"),
        "{w}"
    );
    assert!(!w.contains("ETHUSDT"), "{w}");
    assert!(w.contains("P33_POLL_SECS"), "{w}");
}

#[test]
fn check_config_warns_of_settings_that_cannot_be_meant() {
    let c = cfg(&[
        ("P33_SNAPSHOT_SOURCE", "binance"),
        ("BINANCE_TESTNET_API_KEY", "k"),
        ("BINANCE_TESTNET_API_SECRET", "s"),
        ("BINANCE_API_KEY", "k2"),
        ("REDIS_PASWORD", "x"),
        ("P33_POLL_SEC", "15"),
        ("P33_STALE_THRESHOLD_SEC", "10"),
        ("P33_METRICS_ADDR", "0.0.0.0"),
        ("P33_POSITION_STREAM", "off"),
        ("P33_TRADE_CLOSED_EVENTS", "true"),
    ])
    .unwrap();
    assert!(!c.trade_closed_events);
    let w = c.warnings().join("\n");
    for want in [
        "REDIS_PASWORD is not a variable this daemon reads; did you mean REDIS_PASSWORD?",
        "P33_TRADE_CLOSED_EVENTS=true does nothing without the user data stream",
        "testnet and mainnet exchange credentials are both set",
        "P33_POLL_SEC=15 is not below P33_STALE_THRESHOLD_SEC=10",
        "P33_METRICS_ADDR=0.0.0.0 is not loopback",
    ] {
        assert!(w.contains(want), "{want}: {w}");
    }
    assert!(!w.contains("\"x\""), "no value of a secret-like name: {w}");
    let quiet = cfg(&[
        ("P33_SNAPSHOT_SOURCE", "external"),
        ("P33_METRICS_ADDR", "127.0.0.1"),
        ("REDIS_OTHER_SERVICE_SETTING", "1"),
    ])
    .unwrap();
    assert!(quiet.warnings().is_empty(), "{:?}", quiet.warnings());
    assert_eq!(edit_distance("REDIS_PASWORD", "REDIS_PASSWORD"), 1);
}

#[test]
fn check_config_reads_the_credstore_outside_the_unit() {
    let dir = std::env::temp_dir().join(format!("p33-credstore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("position-state-brain.redis_password"),
        "store-pw\n",
    )
    .unwrap();
    let env: HashMap<String, String> = HashMap::new();
    let (env, sources, errors) = credentials_from(
        env,
        Purpose::Check,
        CredentialSource::Store(vec![dir.join("absent"), dir.clone()]),
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(env["REDIS_PASSWORD"], "store-pw");
    let from = &sources["REDIS_PASSWORD"];
    assert!(
        from.contains("position-state-brain.redis_password, as the unit loads it"),
        "{from}"
    );
    // A bad file there is named, never read as a secret.
    std::fs::write(
        dir.join("position-state-brain.redis_password"),
        " store-pw\n",
    )
    .unwrap();
    let (_, _, errors) = credentials_from(
        HashMap::new(),
        Purpose::Check,
        CredentialSource::Store(vec![dir.clone()]),
    );
    let e = format!("{errors:?}");
    assert!(
        e.contains("position-state-brain.redis_password has whitespace"),
        "{e}"
    );
    assert!(!e.contains("store-pw"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shipped_placeholder_password_is_warned_of() {
    for (name, value) in [
        ("REDIS_PASSWORD", "CHANGE-ME-p33"),
        ("REDIS_URL", "redis://p33:change-me-p33@127.0.0.1:6379/0"),
    ] {
        let c = cfg(&[(name, value)]).unwrap();
        let w = c.warnings().join("\n");
        assert!(w.contains("REDIS_PASSWORD is a shipped placeholder"), "{w}");
        assert!(!w.to_ascii_lowercase().contains("change-me-p33"), "{w}");
    }
    let c = cfg(&[("REDIS_PASSWORD", "a-real-one")]).unwrap();
    assert!(!c.warnings().join("").contains("placeholder"));
}

#[test]
fn rates_parse_and_bad_ones_are_named() {
    let c = cfg(&[
        ("P33_MAX_OPENS", "20/60s"),
        ("P33_MAX_OPENS_PER_SYMBOL", " 2 / 0.5 "),
    ])
    .unwrap();
    assert_eq!(
        c.max_opens,
        Some(Rate {
            limit: 20,
            window: Duration::from_secs(60)
        })
    );
    assert_eq!(
        c.max_opens_per_symbol.unwrap().window,
        Duration::from_millis(500)
    );
    assert!(
        cfg(&[]).unwrap().max_opens.is_none(),
        "off unless configured"
    );
    for bad in [
        "20",
        "0/60s",
        "x/60s",
        "20/0s",
        "20/-1s",
        "20/NaNs",
        "20/1e300s",
        "-3/60s",
    ] {
        let e = cfg(&[("P33_MAX_OPENS", bad)]).unwrap_err();
        assert_eq!(e.0.len(), 1, "{bad}: {e}");
        assert_eq!(e.0[0].var, "P33_MAX_OPENS", "{bad}");
    }
}

#[test]
fn fractional_durations_are_accepted() {
    let c = cfg(&[("P33_POLL_SEC", "0.5"), ("P33_ALLOWLIST_REFRESH_S", "1.25")]).unwrap();
    assert_eq!(c.poll_interval, Duration::from_millis(500));
    assert_eq!(c.allowlist_refresh, Duration::from_millis(1250));
}

#[test]
fn booleans_accept_every_spelling() {
    for (s, want) in [
        ("true", true),
        ("TRUE", true),
        ("1", true),
        ("yes", true),
        ("On", true),
        ("false", false),
        ("0", false),
        ("No", false),
        ("OFF", false),
    ] {
        let c = cfg(&[("P33_DRY_RUN", s)]).unwrap();
        assert_eq!(c.dry_run, want, "P33_DRY_RUN={s}");
    }
    assert!(cfg(&[("P33_DRY_RUN", "maybe")]).is_err());
}

#[test]
fn dry_run_has_its_own_group() {
    let c = cfg(&[("P33_DRY_RUN", "yes")]).unwrap();
    assert_eq!(c.consumer_group, "p33-dryrun");
    assert_eq!(c.ledger_group(), "p33-ledger-dryrun");
}

#[test]
fn every_bad_variable_is_reported_with_its_value() {
    let e = cfg(&[
        ("P33_POLL_SEC", "abc"),
        ("P33_STALE_THRESHOLD_SEC", "-1"),
        ("P33_METRICS_PORT", "99999"),
        ("P33_LOG_FORMAT", "xml"),
        ("P33_ALLOWLIST_SOURCE", "magic"),
        ("P33_UNIVERSE_MAX_AGE_S", "NaN"),
        ("P33_PERMIT_TTL", "1e300"),
        ("P33_CLAIM_IDLE_S", "31536001"),
    ])
    .unwrap_err();
    let vars: Vec<&str> = e.0.iter().map(|e| e.var.as_str()).collect();
    for v in [
        "P33_POLL_SEC",
        "P33_STALE_THRESHOLD_SEC",
        "P33_METRICS_PORT",
        "P33_LOG_FORMAT",
        "P33_ALLOWLIST_SOURCE",
        "P33_UNIVERSE_MAX_AGE_S",
        "P33_PERMIT_TTL",
        "P33_CLAIM_IDLE_S",
    ] {
        assert!(vars.contains(&v), "{v} reported in {vars:?}");
    }
    let text = e.to_string();
    assert!(text.contains("P33_POLL_SEC=\"abc\""), "{text}");
    assert_eq!(text.lines().count(), 8, "one line per variable: {text}");
}

#[test]
fn redis_url_wins_and_password_is_redacted() {
    let c = cfg(&[
        ("REDIS_URL", "redis://:hunter2@127.0.0.1:7000/3"),
        ("REDIS_HOST", "elsewhere"),
    ])
    .unwrap();
    assert_eq!(c.redis.display(), "redis://[redacted]@127.0.0.1:7000/3");
    assert!(!format!("{c:?}").contains("hunter2"));
    let c = cfg(&[
        ("REDIS_HOST", "10.0.0.5"),
        ("REDIS_PORT", "6380"),
        ("REDIS_DB", "2"),
        ("REDIS_PASSWORD", "s3cret"),
    ])
    .unwrap();
    assert_eq!(c.redis.display(), "redis://[redacted]@10.0.0.5:6380/2");
    assert_eq!(c.redis.info.redis.password.as_deref(), Some("s3cret"));
    assert!(!format!("{c:?}").contains("s3cret"));
    let e = cfg(&[("REDIS_URL", "http://:pw@x")]).unwrap_err();
    assert!(!e.to_string().contains("pw@"), "{e}");
    for bad in [
        "redis//:hunter2@host:6379",
        ":hunter2@host",
        "redis:/user:hunter2@host",
        "redis://:hunter2@@host:notaport",
        "hunter2@",
    ] {
        let e = cfg(&[("REDIS_URL", bad)]).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{bad} -> {e}");
        assert!(e.contains("REDIS_URL"), "{e}");
    }
    assert_eq!(
        redact_url("redis//host:6379?password=hunter2&x=1"),
        "redis//host:6379?password=[redacted]&x=1"
    );
}

#[test]
fn acl_users_and_tls_settings() {
    // REDIS_USERNAME applies when the URL names no user.
    let c = cfg(&[("REDIS_USERNAME", "p33"), ("REDIS_PASSWORD", "pw")]).unwrap();
    assert_eq!(c.redis.info.redis.username.as_deref(), Some("p33"));
    let c = cfg(&[
        ("REDIS_URL", "redis://ops:pw@127.0.0.1:6390/0"),
        ("REDIS_USERNAME", "p33"),
    ])
    .unwrap();
    assert_eq!(c.redis.info.redis.username.as_deref(), Some("ops"));
    // The sentinels' own user: with them only.
    let c = cfg(&[
        ("REDIS_SENTINELS", "127.0.0.1:26379"),
        ("REDIS_SENTINEL_MASTER", "quantum"),
        ("REDIS_SENTINEL_USERNAME", "watcher"),
        ("REDIS_SENTINEL_PASSWORD", "x"),
    ])
    .unwrap();
    let s = c.redis.sentinel.as_ref().unwrap();
    assert_eq!(s.username.as_deref(), Some("watcher"));
    assert_eq!(s.tls, None);
    let e = cfg(&[("REDIS_SENTINEL_USERNAME", "watcher")]).unwrap_err();
    assert!(e.to_string().contains("REDIS_SENTINEL_USERNAME"), "{e}");
    // TLS: a plain address becomes TLS; the CA file only with it.
    let c = cfg(&[("REDIS_TLS", "true"), ("REDIS_HOST", "redis-1")]).unwrap();
    assert!(matches!(
        &c.redis.info.addr,
        redis::ConnectionAddr::TcpTls { host, insecure: false, .. } if host == "redis-1"
    ));
    assert!(
        c.redis.display().starts_with("rediss://redis-1:6379/"),
        "{}",
        c.redis.display()
    );
    let e = cfg(&[("REDIS_TLS_CA_FILE", "/nonexistent")]).unwrap_err();
    assert!(e.to_string().contains("set without REDIS_TLS=true"), "{e}");
    let e = cfg(&[
        ("REDIS_TLS", "true"),
        ("REDIS_TLS_CA_FILE", "/nonexistent/ca.crt"),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("cannot be read"), "{e}");
    let c = cfg(&[
        ("REDIS_TLS", "true"),
        ("REDIS_SENTINELS", "127.0.0.1:26379"),
        ("REDIS_SENTINEL_MASTER", "quantum"),
    ])
    .unwrap();
    assert_eq!(
        c.redis.sentinel.as_ref().unwrap().tls,
        Some(None),
        "TLS, webpki roots"
    );
}

#[test]
fn sentinel_variables_come_together_and_never_with_redis_url() {
    let c = cfg(&[
        (
            "REDIS_SENTINELS",
            "127.0.0.1:26379, [::1]:26380,sentinel-3:26381",
        ),
        ("REDIS_SENTINEL_MASTER", "quantum"),
        ("REDIS_SENTINEL_PASSWORD", "s3ntinel"),
        ("REDIS_PASSWORD", "n0de"),
        ("REDIS_DB", "2"),
    ])
    .unwrap();
    let s = c.redis.sentinel.as_ref().expect("sentinel mode");
    assert_eq!(
        s.sentinels,
        vec![
            ("127.0.0.1".to_string(), 26379),
            ("::1".to_string(), 26380),
            ("sentinel-3".to_string(), 26381)
        ]
    );
    assert_eq!(s.master, "quantum");
    assert_eq!(
        c.redis.display(),
        "redis+sentinel://[redacted]@127.0.0.1:26379,[::1]:26380,sentinel-3:26381/quantum/2"
    );
    assert_eq!(c.redis.info.redis.password.as_deref(), Some("n0de"));
    let shown = format!("{c:?} {:?}", c.effective());
    assert!(
        !shown.contains("s3ntinel") && !shown.contains("n0de"),
        "{shown}"
    );

    // (pairs, the variable the one error names, what it says)
    type Row<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let rows: &[Row] = &[
        (
            &[("REDIS_SENTINELS", "127.0.0.1:26379")],
            "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
            "REDIS_SENTINEL_MASTER unset",
        ),
        (
            &[("REDIS_SENTINEL_MASTER", "quantum")],
            "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
            "REDIS_SENTINELS unset",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1:26379"),
                ("REDIS_SENTINEL_MASTER", " "),
            ],
            "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
            "REDIS_SENTINEL_MASTER unset",
        ),
        (
            &[
                ("REDIS_SENTINELS", ""),
                ("REDIS_SENTINEL_MASTER", "quantum"),
            ],
            "REDIS_SENTINELS/REDIS_SENTINEL_MASTER",
            "REDIS_SENTINELS unset",
        ),
        (
            &[("REDIS_SENTINEL_PASSWORD", "x")],
            "REDIS_SENTINEL_PASSWORD",
            "without REDIS_SENTINELS",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1:26379"),
                ("REDIS_SENTINEL_MASTER", "q"),
                ("REDIS_URL", "redis://127.0.0.1:6390/0"),
            ],
            "REDIS_URL/REDIS_SENTINELS",
            "both set",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1"),
                ("REDIS_SENTINEL_MASTER", "q"),
            ],
            "REDIS_SENTINELS",
            "not host:port",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1:0"),
                ("REDIS_SENTINEL_MASTER", "q"),
            ],
            "REDIS_SENTINELS",
            "no valid port",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1:26379,h:65536"),
                ("REDIS_SENTINEL_MASTER", "q"),
            ],
            "REDIS_SENTINELS",
            "no valid port",
        ),
        (
            &[("REDIS_SENTINELS", "h:x"), ("REDIS_SENTINEL_MASTER", "q")],
            "REDIS_SENTINELS",
            "no valid port",
        ),
        (
            &[
                ("REDIS_SENTINELS", "::1:26379"),
                ("REDIS_SENTINEL_MASTER", "q"),
            ],
            "REDIS_SENTINELS",
            "not host:port",
        ),
        (
            &[
                ("REDIS_SENTINELS", ":26379"),
                ("REDIS_SENTINEL_MASTER", "q"),
            ],
            "REDIS_SENTINELS",
            "no valid host",
        ),
        (
            &[("REDIS_SENTINELS", ",,"), ("REDIS_SENTINEL_MASTER", "q")],
            "REDIS_SENTINELS",
            "at least one",
        ),
    ];
    for (pairs, var, why) in rows {
        let e = cfg(pairs).unwrap_err();
        assert_eq!(e.0.len(), 1, "{pairs:?}: one error, no follow-on: {e}");
        assert_eq!(e.0[0].var, *var, "{pairs:?}: {e}");
        assert!(e.0[0].why.contains(why), "{pairs:?}: {e}");
    }
}

#[test]
fn binance_credentials_are_required_for_binance_snapshots_and_never_printed() {
    let e = Config::from_pairs(Vec::<(String, String)>::new()).unwrap_err();
    assert!(e.to_string().contains("BINANCE_TESTNET_API_KEY"), "{e}");
    let v = |k: &str, s: &str| (k.to_string(), s.to_string());
    let c = Config::from_pairs(vec![
        v("BINANCE_API_KEY", "legacykey"),
        v("BINANCE_API_SECRET", "legacysecret"),
    ])
    .unwrap();
    assert_eq!(c.binance_api_key.as_ref().unwrap().expose(), "legacykey");
    let c = Config::from_pairs(vec![
        v("BINANCE_TESTNET_API_KEY", "tkey"),
        v("BINANCE_TESTNET_API_SECRET", "tsecret"),
        v("BINANCE_API_KEY", "legacykey"),
        v("BINANCE_API_SECRET", "legacysecret"),
    ])
    .unwrap();
    assert_eq!(c.binance_api_secret.as_ref().unwrap().expose(), "tsecret");
    let dbg = format!("{c:?} {:?}", c.effective());
    for s in ["tkey", "tsecret", "legacykey", "legacysecret"] {
        assert!(!dbg.contains(s), "{s} leaked");
    }
}

#[test]
fn allowlist_env_is_trimmed_and_apply_allowlist_is_the_fallback() {
    let c = cfg(&[("P33_ALLOWLIST", " BTCUSDT , ETHUSDT,, ")]).unwrap();
    assert_eq!(c.allowlist_env, vec!["BTCUSDT", "ETHUSDT"]);
    let c = cfg(&[("APPLY_ALLOWLIST", "SOLUSDT")]).unwrap();
    assert_eq!(c.allowlist_env, vec!["SOLUSDT"]);
    let c = cfg(&[("APPLY_ALLOWLIST", "SOLUSDT"), ("P33_ALLOWLIST", "")]).unwrap();
    assert!(
        c.allowlist_env.is_empty(),
        "an explicit empty P33_ALLOWLIST wins"
    );
}

#[test]
fn legacy_and_unknown_variables_are_noted() {
    let c = cfg(&[
        ("UNIVERSE_ENABLE", "true"),
        ("P33_SNAPSHOT_TOP_N", "50"),
        ("P33_POLL_SECS", "1"),
    ])
    .unwrap();
    assert_eq!(
        c.legacy_present,
        vec!["UNIVERSE_ENABLE", "P33_SNAPSHOT_TOP_N"]
    );
    assert_eq!(c.unknown_p33, vec!["P33_POLL_SECS"]);
}

#[test]
fn log_level_maps_python_names_and_rust_log_wins() {
    assert_eq!(
        cfg(&[("P33_LOG_LEVEL", "WARNING")]).unwrap().log_filter,
        "warn"
    );
    assert_eq!(
        cfg(&[("P33_LOG_LEVEL", "debug")]).unwrap().log_filter,
        "debug"
    );
    let c = cfg(&[
        ("P33_LOG_LEVEL", "DEBUG"),
        ("RUST_LOG", "position_state_brain=trace"),
    ]);
    assert_eq!(c.unwrap().log_filter, "position_state_brain=trace");
    assert!(cfg(&[("P33_LOG_LEVEL", "LOUD")]).is_err());
}
