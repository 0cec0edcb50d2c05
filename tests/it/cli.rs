//! The `tollgate` command itself: an invalid configuration is refused at start, naming every
//! bad key; a valid one is accepted by `check-config`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

#[test]
fn serve_refuses_an_invalid_config_naming_each_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        r#"
server: { listen: "not-an-address", request_timeout: "eventually" }
operator: { listen: "127.0.0.1:0" }
plugins: { call_timeout: "0ms" }
channels:
  - { name: up, plugin: openai, base_url: "::nope::", api_key_env: TOLLGATE_TEST_SURELY_UNSET }
models:
  - { name: m, channel: missing }
"#,
    )
    .unwrap();
    let out = tollgate()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "server.listen",
        "server.request_timeout",
        "plugins.call_timeout",
        "channels[0].base_url",
        "channels[0].api_key_env",
        "models[0].channel",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
}

#[test]
fn serve_refuses_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    std::fs::write(
        &path,
        "server: { listen: \"127.0.0.1:0\" }\noperator: { listen: \"127.0.0.1:0\" }\nchanels: []\n",
    )
    .unwrap();
    let out = tollgate()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chanels"));
}

#[test]
fn the_embedded_defaults_are_valid() {
    let out = tollgate().arg("check-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_cli_refuses_a_key_whose_policy_set_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "server: {{ listen: \"127.0.0.1:0\" }}\noperator: {{ listen: \"127.0.0.1:0\" }}\ndatabase: {{ url: \"sqlite://{}\" }}\nmoderation: {{ policies_dir: \"{}\" }}\n",
            dir.path().join("t.db").display(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies")
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        tollgate()
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    assert!(run(&["accounts", "create", "acme"]).status.success());
    let out = run(&[
        "keys",
        "create",
        "--account",
        "acme",
        "--name",
        "k",
        "--policy-set",
        "no-such-set",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-set"), "{err}");
    let out = run(&[
        "keys",
        "create",
        "--account",
        "acme",
        "--name",
        "k",
        "--policy-set",
        "adult",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
