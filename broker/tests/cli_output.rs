//! The `escrow` command line when its reader goes away (`escrow … | head`).

use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_the_command_quietly_instead_of_panicking() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader); // every write to the pipe now fails with EPIPE
    let out = Command::new(env!("CARGO_BIN_EXE_escrow"))
        .args(["serve", "--print-config"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("running escrow");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
}
