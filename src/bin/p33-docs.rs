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
use position_state_brain::lifecycle::Cli;

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
        ("/usr/share/doc/position-state-brain/users.acl", "the Redis ACL users p33, p33-ops, p33-read"),
    ] {
        s.push_str(&format!(".TP\n\\fI{}\\fR\n{}\n", roff(f), roff(what)));
    }
    s.push_str(".SH EXIT STATUS\n0 clean, 64 usage error, 78 configuration error (systemd does not restart it), 1 other fatal error.\n");
    s.push_str(".SH SEE ALSO\n\\fBposition-state-brain-ctl\\fR(8), \\fBposition-state-brain-explain\\fR(8), \\fBposition-state-brain-replay\\fR(8); /usr/share/doc/position-state-brain/README.md\n");
    s
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
    let cmd = Cli::command();
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
        for c in sub.get_subcommands() {
            todo.push((format!("{name}-{}", c.get_name()), c.clone()));
        }
        written.push(page(sub, &name, &man)?);
    }
    for (shell, file) in [
        (Shell::Bash, format!("{BIN}.bash")),
        (Shell::Zsh, format!("_{BIN}")),
        (Shell::Fish, format!("{BIN}.fish")),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), BIN, &mut buf);
        let path = completions.join(file);
        std::fs::write(&path, buf)?;
        written.push(path);
    }
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}
