//! `p33-docs`: writes the man pages and shell completions of
//! `position-state-brain`, generated from its clap definition (SPEC §18), so
//! they never drift from `--help`.
//!
//! Usage: `p33-docs <dir>` → `<dir>/man/position-state-brain.8` and one page
//! per subcommand (`position-state-brain-ctl.8`, `-explain.8`, `-replay.8`),
//! `<dir>/completions/position-state-brain.bash`, `_position-state-brain`
//! (zsh) and `position-state-brain.fish`. The Debian package ships them.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use position_state_brain::app::lifecycle::Cli;

const BIN: &str = "position-state-brain";

/// One page in section 8 (a daemon and its administration commands).
fn page(cmd: clap::Command, name: &str, dir: &Path) -> std::io::Result<PathBuf> {
    // A short-lived tool: the name lives as long as the process anyway.
    let cmd = cmd.name(&*Box::leak(name.to_string().into_boxed_str()));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .title(name.to_ascii_uppercase())
        .section("8")
        .manual("P3.3 Position State Brain")
        .source(format!("{BIN} {}", env!("CARGO_PKG_VERSION")))
        .render(&mut out)?;
    let path = dir.join(format!("{name}.8"));
    std::fs::write(&path, out)?;
    Ok(path)
}

/// Text for roff: backslashes escaped, no line read as a request.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// ENVIRONMENT (every variable of SPEC §2, from the daemon's own table)
/// and FILES.
fn environment_and_files() -> String {
    let mut s = String::from(".SH ENVIRONMENT\nConfiguration comes from the environment only; \\fB--check-config\\fR prints what is in effect.\n");
    for v in position_state_brain::config::VARS {
        s.push_str(".TP\n");
        match v.default {
            Some(d) => s.push_str(&format!("\\fB{}\\fR (default: {})\n", v.name, roff(d))),
            None => s.push_str(&format!("\\fB{}\\fR\n", v.name)),
        }
        s.push_str(&roff(v.doc));
        s.push('\n');
    }
    s.push_str(".SH FILES\n");
    for (f, what) in [
        ("/etc/quantum/position-state-brain.env", "the settings (no secrets)"),
        ("/etc/credstore/position-state-brain.<name>", "the secrets as systemd credentials: binance_api_key, binance_api_secret, redis_password, redis_sentinel_password"),
        ("/lib/systemd/system/quantum-position-state-brain.service", "the unit (and quantum-position-state-brain@.service, one per instance)"),
        ("/usr/share/doc/position-state-brain/users.acl", "the Redis ACL users p33, p33-ops, p33-read, with no password (position-state-brain acl prints them with the passwords' SHA-256)"),
    ] {
        s.push_str(&format!(".TP\n\\fI{}\\fR\n{}\n", roff(f), roff(what)));
    }
    s.push_str(".SH EXIT STATUS\n0 clean, 64 usage error, 78 configuration error (systemd does not restart it), 1 other fatal error.\n");
    s.push_str(".SH SEE ALSO\n\\fBposition-state-brain-ctl\\fR(8), \\fBposition-state-brain-explain\\fR(8), \\fBposition-state-brain-replay\\fR(8), \\fBposition-state-brain-acl\\fR(8); /usr/share/doc/position-state-brain/README.md\n");
    s
}

/// What a tool's page adds (issue 28 item 9): the Redis settings it reads,
/// the ACL user it needs, its exit codes and examples; `None` for a page
/// that is not a tool's.
fn tool_sections(name: &str) -> Option<String> {
    let tool = name.strip_prefix(&format!("{BIN}-"))?;
    if tool == "acl" {
        return Some(acl_sections());
    }
    let (user, exit, examples): (&str, &str, &[&str]) = match tool {
        "ctl" | "ctl-halt" | "ctl-reduce" | "ctl-resume" => (
            "p33-ops: a change runs the function library a gate installed (FCALL), which sets the trading-state key, adds the control entry and ends the latch; where no gate has connected since Redis lost its data, a halt is written with plain commands and reduce/resume are refused (exit 1, nothing changed)",
            "0 written and read by a running gate; 1 Redis cannot be reached, or the change was refused (nothing changed); 3 written, but no instance reported in the last 15 s (WARNING: no running gate reads host:port/db); 64 usage error; 78 configuration error.",
            &[
                "position-state-brain ctl halt --reason \"runaway strategy, ticket 4711\"",
                "position-state-brain ctl reduce --symbol SOLUSDT --reason \"bad fills\"",
                "position-state-brain ctl resume --reason \"all clear\"",
            ],
        ),
        "ctl-status" => (
            "p33-read or p33-ops (read access to quantum:*)",
            "0 printed; 1 Redis cannot be reached; 64 usage error; 78 configuration error.",
            &["position-state-brain ctl status", "position-state-brain ctl status --json"],
        ),
        "explain" => (
            "p33-read (read access to quantum:*)",
            "0 a record was found and explained; 1 no record holds that plan_id (or the prefix is ambiguous), or Redis cannot be reached; 64 usage error; 78 configuration error.",
            &["position-state-brain explain 7f3c2a1b"],
        ),
        "replay" => (
            "p33-read (read access to quantum:*)",
            "0 replayed; 1 Redis cannot be reached, or no such --instance; 78 a --set of a variable replay does not judge with, or a bad value.",
            &[
                "position-state-brain replay --last 10000 --set P33_QTY_TOLERANCE_PCT=0.5",
                "position-state-brain replay --since 2h --from-env --json",
            ],
        ),
        _ => return None,
    };
    let mut s = String::new();
    if tool == "ctl-halt" || tool == "ctl-reduce" {
        s.push_str(".SH REVOCATION
The change is in force for every permit written after it returns. A running gate also revokes the allows already written and not yet used (for reduce: the opening ones), in bounded steps; ctl waits up to 2 s and prints \\fBrevoked N outstanding allows\\fR or \\fBrevoking: N so far\\fR.\n");
    }
    s.push_str(".SH ENVIRONMENT\nOnly the Redis settings are read, never the exchange's: first \\fI/etc/quantum/position-state-brain-ctl.env\\fR when it is there (REDIS_* names only; mode 0640, group p33-ops), then the environment; the password from \\fBREDIS_PASSWORD_FILE\\fR when no variable gives one.\n");
    for v in position_state_brain::config::VARS {
        if v.name.starts_with("REDIS_") || v.name == "P33_CTL_ENV_FILE" {
            s.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", v.name, roff(v.doc)));
        }
    }
    s.push_str(&format!(".SH REDIS USER\n{}\n", roff(user)));
    s.push_str(&format!(".SH EXIT STATUS\n{}\n", roff(exit)));
    s.push_str(".SH EXAMPLES\n");
    for e in examples {
        s.push_str(&format!(".PP\n.nf\n{}\n.fi\n", roff(e)));
    }
    s.push_str(&format!(".SH SEE ALSO\n\\fB{BIN}\\fR(8); /usr/share/doc/position-state-brain/README.md, runbook.md\n"));
    Some(s)
}

/// The `acl` page: where it reads the passwords, what it prints, exits.
fn acl_sections() -> String {
    let mut s = String::from(".SH FILES\nThe password files, each a regular file (one trailing newline dropped; any other blank around the password is an error):\n");
    for (user, _) in position_state_brain::operator::acl::USERS {
        let f = position_state_brain::operator::acl::default_password_file(user)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        s.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", roff(user), roff(&f)));
    }
    s.push_str(".PP\nA user whose default file is missing gets a line with no password (it cannot log in), said on standard error.\n");
    s.push_str(".SH OUTPUT\nOne ACL line per user on standard output, with \\fB#\\fR and the SHA-256 of the password, never the password; Redis's aclfile format (ACL LOAD). With \\fB--pipeline\\fR: lines for the other services' users that allow every command, channel and key but writes to quantum:permit:p33:*, quantum:p33:* and quantum:stream:p33.* (and FLUSHALL, FLUSHDB, SWAPDB, REPLICAOF, FAILOVER, ACL, CONFIG, DEBUG, MODULE, FUNCTION FLUSH|DELETE|RESTORE); \\fBdefault\\fR keeps nopass unless a password file is given.\n");
    s.push_str(".SH EXIT STATUS\n0 printed; 64 usage error; 78 a password file that cannot be used (missing when named, not a regular file, empty, blanks around it, or a shipped CHANGE-ME placeholder), named, never its content.\n");
    s.push_str(".SH EXAMPLES\n.PP\n.nf\nposition-state-brain acl > /etc/redis/users.acl && redis-cli ACL LOAD\n.fi\n.PP\n.nf\nposition-state-brain acl --pipeline default >> /etc/redis/users.acl\n.fi\n");
    s.push_str(&format!(".SH SEE ALSO\n\\fB{BIN}\\fR(8); /usr/share/doc/position-state-brain/README.md (Security)\n"));
    s
}

/// clap_complete's bash script with the subcommands' names mended: its loop
/// builds `position__state__brain__subcmd__ctl` from the words typed, but
/// the `case` labels it writes for every level below the top read
/// `position__subcmd__state__subcmd__brain__subcmd__ctl` (each `-` of the
/// binary's name taken for a subcommand boundary), so `ctl <TAB>` offered
/// nothing. The labels are made to match the loop.
fn bash_fixed(script: &[u8]) -> Vec<u8> {
    let wrong = BIN.replace('-', "__subcmd__");
    let right = BIN.replace('-', "__");
    String::from_utf8_lossy(script)
        .replace(&wrong, &right)
        .into_bytes()
}

fn main() -> std::io::Result<()> {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: p33-docs <dir>");
        std::process::exit(64);
    };
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // No `help` subcommand on the pages: it has no page of its own.
    let cmd = Cli::command().disable_help_subcommand(true);
    let main_page = page(cmd.clone(), BIN, &man)?;
    // The daemon's page also lists its environment and files.
    let mut text = std::fs::read_to_string(&main_page)?;
    text.push_str(&environment_and_files());
    std::fs::write(&main_page, text)?;
    let mut written = vec![main_page];
    // One page per subcommand, at every depth (`ctl` names `ctl-status`).
    let mut todo: Vec<(String, clap::Command)> = cmd
        .get_subcommands()
        .map(|c| (format!("{BIN}-{}", c.get_name()), c.clone()))
        .collect();
    while let Some((name, sub)) = todo.pop() {
        let sub = sub.disable_help_subcommand(true);
        for c in sub.get_subcommands() {
            todo.push((format!("{name}-{}", c.get_name()), c.clone()));
        }
        let path = page(sub, &name, &man)?;
        if let Some(extra) = tool_sections(&name) {
            let mut text = std::fs::read_to_string(&path)?;
            text.push_str(&extra);
            std::fs::write(&path, text)?;
        }
        written.push(path);
    }
    for (shell, file) in [
        (Shell::Bash, format!("{BIN}.bash")),
        (Shell::Zsh, format!("_{BIN}")),
        (Shell::Fish, format!("{BIN}.fish")),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), BIN, &mut buf);
        if shell == Shell::Bash {
            buf = bash_fixed(&buf);
        }
        let path = completions.join(file);
        std::fs::write(&path, buf)?;
        written.push(path);
    }
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}
