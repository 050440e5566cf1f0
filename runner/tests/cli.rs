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
