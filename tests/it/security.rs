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
            format!("$CREDENTIALS_DIRECTORY/{name} cannot be read")
        };
        assert!(err.contains(&want), "{want} in:\n{err}");
    }
}
