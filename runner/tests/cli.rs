//! The `freerelay` binary: keygen output and `up`'s startup errors (exit code and message).

use std::process::{Command, Output};

fn freerelay(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_freerelay"))
        .args(args)
        .current_dir(dir)
        .env_remove("SPIN_VARIABLE_TOKEN")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `freerelay up --listen <listen>` in `dir` with the required `token` variable set.
fn up_with_token(dir: &std::path::Path, listen: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_freerelay"))
        .args(["up", "--listen", listen])
        .current_dir(dir)
        .env("SPIN_VARIABLE_TOKEN", "x")
        .output()
        .unwrap()
}

/// The command failed, and said so with `needle` on stderr.
fn assert_fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "{}", stderr(out));
    assert!(stderr(out).contains(needle), "{}", stderr(out));
}

const MANIFEST: &str = r#"
spin_manifest_version = 2
[application]
name = "t"
[variables]
token = { required = true, secret = true }
base = { default = "https://api.example.com" }
[[trigger.http]]
route = "/..."
component = "gateway"
[component.gateway]
source = "components/target/wasm32-wasip2/release/freerelay_gateway.wasm"
key_value_stores = ["default"]
allowed_outbound_hosts = ["{{ base }}"]
"#;

#[test]
fn keygen_prints_key_and_matching_digest() {
    let dir = tempfile::tempdir().unwrap();
    let out = freerelay(&["keygen"], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let key = lines[0].strip_prefix("key: ").unwrap();
    let digest = lines[1].strip_prefix("digest: ").unwrap();
    assert!(key.starts_with("fr-"));
    assert_eq!(digest, freerelay_cli::keygen::digest(key));

    let out = freerelay(&["keygen", "--digest-of", key], dir.path());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), digest);

    let out = freerelay(&["keygen", "--quiet"], dir.path());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[1], freerelay_cli::keygen::digest(lines[0]));
}

#[test]
fn up_fails_clearly_on_a_required_variable_without_value() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spin.toml"), MANIFEST).unwrap();
    let out = freerelay(&["up", "--listen", "127.0.0.1:0"], dir.path());
    assert_fails_with(&out, "required variable \"token\"");
}

#[test]
fn up_fails_clearly_on_a_missing_component_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spin.toml"), MANIFEST).unwrap();
    let out = up_with_token(dir.path(), "127.0.0.1:0");
    assert_fails_with(&out, "component 'gateway': source 'components/target/wasm32-wasip2/release/freerelay_gateway.wasm' not found — run scripts/build");
}

#[test]
fn up_reads_variables_from_dotenv_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spin.toml"), MANIFEST).unwrap();
    std::fs::write(dir.path().join(".env"), "SPIN_VARIABLE_TOKEN=from-dotenv\n").unwrap();
    let out = freerelay(&["up", "--listen", "127.0.0.1:0"], dir.path());
    // The variable resolves, so startup proceeds to the (missing) component file.
    assert!(
        stderr(&out).contains("not found — run scripts/build"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn up_fails_clearly_when_the_port_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spin.toml"), MANIFEST).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = up_with_token(dir.path(), &addr);
    assert_fails_with(&out, &format!("{addr} is already in use"));
}

#[test]
fn up_rejects_bad_allowed_hosts_and_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let with_path = MANIFEST.replace("https://api.example.com\"", "https://api.example.com/v1\"");
    std::fs::write(dir.path().join("spin.toml"), with_path).unwrap();
    let out = up_with_token(dir.path(), "127.0.0.1:0");
    assert_fails_with(&out, "hosts must not contain paths");

    std::fs::write(
        dir.path().join("bad.toml"),
        "spin_manifest_version = 2\n[application\n",
    )
    .unwrap();
    let out = freerelay(&["up", "-f", "bad.toml"], dir.path());
    assert_fails_with(&out, "invalid manifest");
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn policy_check_accepts_a_valid_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = "\
# tenant acme
exclude nvidia, openrouter/meta-llama/llama-3.3-70b-instruct:free
prefer groq, gemini
cap temperature 0.7
when family = code and depth >= medium: prefer anthropic/claude-sonnet-4-5, openai
when background: mode free; cache on
";
    std::fs::write(dir.path().join("acme.policy"), policy).unwrap();
    let out = freerelay(&["policy", "check", "acme.policy"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "acme.policy: ok (5 rules)\n");
    assert_eq!(stderr(&out), "");

    std::fs::write(dir.path().join("one"), "hedge on\n").unwrap();
    let out = freerelay(&["policy", "check", "one"], dir.path());
    assert_eq!(stdout(&out), "one: ok (1 rule)\n");
    std::fs::write(dir.path().join("empty"), "# nothing yet\n").unwrap();
    let out = freerelay(&["policy", "check", "empty"], dir.path());
    assert_eq!(stdout(&out), "empty: ok (0 rules)\n");
}

#[test]
fn policy_check_reports_every_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let policy = "\
prefer groq
prefer 12
when family < code: mode paid
cache on
when depth = high mode paid
";
    std::fs::write(dir.path().join("bad.policy"), policy).unwrap();
    let out = freerelay(&["policy", "check", "bad.policy"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "");
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with("bad.policy:2:8: expected a provider id (groq, ")
            && lines[0].ends_with(", custom), found \"12\""),
        "{err}"
    );
    assert_eq!(
        lines[1],
        "bad.policy:3:13: expected `=`, `!=` or `in` (family is not ordered), found \"<\""
    );
    assert_eq!(
        lines[2],
        "bad.policy:5:19: expected `:`, `and` or `or`, found \"mode\""
    );
}

#[test]
fn policy_check_fails_clearly_on_unreadable_or_non_utf8_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = freerelay(&["policy", "check", "missing.policy"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("missing.policy: cannot read the policy file: "),
        "{}",
        stderr(&out)
    );

    std::fs::write(dir.path().join("latin1"), b"prefer groq\nprefer gr\xe9q\n").unwrap();
    let out = freerelay(&["policy", "check", "latin1"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "latin1:2:10: expected UTF-8 text, found byte 0xe9\n"
    );
}
