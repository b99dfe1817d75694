//! The command line, run as a user runs it.

use std::process::Command;

fn paddock(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paddock")).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn version_names_the_release_and_the_build() {
    let (ok, text) = paddock(&["--version"]);
    assert!(ok, "{text}");
    assert!(text.starts_with(&format!("paddock {}", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("git ") && text.contains("built "), "{text}");
}

#[test]
fn serve_help_explains_every_flag_and_its_environment_variable() {
    let (ok, text) = paddock(&["serve", "--help"]);
    assert!(ok, "{text}");
    for flag in ["--config", "--host", "--port", "--data-dir", "--model"] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    for var in ["PADDOCK_HOST", "PADDOCK_PORT", "PADDOCK_DATA_DIR", "PADDOCK_ADMIN_PASSWORD"] {
        assert!(text.contains(var), "{var} missing from:\n{text}");
    }
}

#[test]
fn a_bad_config_file_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("paddock.yaml");
    std::fs::write(&file, "prot: 1\n").unwrap();
    let (ok, text) = paddock(&["serve", "--config", file.to_str().unwrap(), "--port", "0"]);
    assert!(!ok);
    assert!(text.contains("invalid config file") && text.contains("prot"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn listening_beyond_loopback_without_credentials_refuses_to_start_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_paddock"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", dir.path().to_str().unwrap()])
        .env_remove("PADDOCK_ADMIN_PASSWORD")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("PADDOCK_ADMIN_PASSWORD") && text.contains("127.0.0.1"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}
