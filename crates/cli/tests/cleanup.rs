//! Nothing is left behind: no process and no temp directory after a demo,
//! whether it ends normally, is interrupted (Ctrl-C) or is killed.

use std::path::Path;
use std::time::Duration;

use tether_testkit::eventually;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// Command lines of the processes that inherited `marker` in their environment.
fn carrying(marker: &str) -> Vec<String> {
    tether_testkit::processes_with_env("TETHER_TEST_MARKER", marker)
        .into_iter()
        .map(|(_, cmd)| cmd)
        .collect()
}

async fn nothing_left(marker: &str, tmp: Option<&Path>) {
    eventually(Duration::from_secs(10), "every process gone", || async {
        carrying(marker).is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", carrying(marker)));
    if let Some(tmp) = tmp {
        let left: Vec<_> = std::fs::read_dir(tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "temp files left behind: {left:?}");
    }
}

fn demo(marker: &str, tmp: &Path, seconds: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args([
        "demo",
        "--only",
        "local,replicated-backup,redis",
        "--scenario",
        "kill",
        "--users",
        "5",
        "--rate",
        "50",
        "--seconds",
        seconds,
        "--json",
    ])
    .env("TETHER_TEST_MARKER", marker)
    .env("TMPDIR", tmp)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_interrupted_or_killed_demo_leaves_nothing_behind() {
    // Finished.
    let marker = tether_core::SessionId::random().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let status = demo(&marker, tmp.path(), "1").status().await.unwrap();
    assert!(status.success());
    nothing_left(&marker, Some(tmp.path())).await;

    // Interrupted (Ctrl-C) half-way: it stops what it started and cleans up.
    for signal in [tether_testkit::SIGINT, tether_testkit::SIGKILL] {
        let marker = tether_core::SessionId::random().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let mut child = demo(&marker, tmp.path(), "3600").spawn().unwrap();
        eventually(
            Duration::from_secs(20),
            "the demo's nodes running",
            || async { (carrying(&marker).len() > 2).then_some(()) },
        )
        .await
        .unwrap();
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe {
            libc::kill(child.id().unwrap() as libc::pid_t, signal);
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap();
        // A SIGKILLed demo cannot delete its temp files; its processes still die
        // with it (the kernel signals them when their parent goes).
        let tmp_check = (signal == tether_testkit::SIGINT).then(|| tmp.path());
        nothing_left(&marker, tmp_check).await;
    }
}
