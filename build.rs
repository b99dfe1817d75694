//! Records version, git revision and build time for `/api/system/info` and `--version`.
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    println!("cargo:rustc-env=PADDOCK_GIT_REVISION={rev}");
    println!("cargo:rustc-env=PADDOCK_BUILD_UNIX={secs}");
    // Re-run when HEAD moves, not on every source change.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
