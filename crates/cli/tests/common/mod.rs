//! What more than one end-to-end test file needs.

use std::path::Path;

/// The `tether` binary under test.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// Runs `tether demo ARGS` to the end; its standard output.
///
/// # Panics
/// If it fails, with what it wrote on stderr.
pub async fn demo(args: &[&str], report: Option<&Path>) -> Vec<u8> {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg("demo").args(args).arg("--json");
    if let Some(path) = report {
        cmd.arg("--report").arg(path);
    }
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
