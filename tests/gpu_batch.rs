//! `examples/gpu_batch.rs` where there is no GPU: it says so, plainly, and exits cleanly.
//! (On a GPU machine it is run by hand; see BENCHMARKS.md.)

use std::path::PathBuf;
use std::process::Command;

#[path = "common/example_binary.rs"]
mod example_binary;

/// The example's binary.
fn example() -> PathBuf {
    example_binary::example_binary("gpu_batch")
}

#[test]
fn without_a_gpu_it_says_so_and_exits_cleanly() {
    // No `nvidia-smi` on the PATH: the local backend finds no GPU to hand out.
    let output = Command::new(example())
        .env("PATH", "/nonexistent")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("gpu_batch: no GPU here"),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("nvidia-smi -L"), "{stdout}");
}

#[test]
fn a_bad_option_is_named() {
    let output = Command::new(example())
        .arg("--chunks")
        .arg("many")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid digit"), "{stderr}");
}

#[test]
fn with_a_gpu_listed_but_no_driver_each_runner_says_what_is_missing() {
    if Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("this machine has real GPUs: run the example itself instead");
        return;
    }
    // A stand-in `nvidia-smi` that lists two GPUs: the pool boots a runner for each, each
    // with its own CUDA_VISIBLE_DEVICES, and the runners find no CUDA driver behind them.
    let bin = std::env::temp_dir().join(format!("gpu-batch-test-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let smi = bin.join("nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\necho 'GPU 1: Stand-in (UUID: GPU-1)'\n",
    )
    .unwrap();
    let executable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&smi, executable).unwrap();
    let output = Command::new(example())
        .args(["--chunks", "4", "--elements", "1024", "--iters", "16"])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&bin);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("gpu_batch: 2 local runners, 1 GPU(s) each"),
        "{stdout}{stderr}"
    );
    // The binary `cargo test` built has the `cuda` feature when the tests were built with it;
    // a binary built on its own may differ, so the outcome is read from what it says.
    if stdout.contains("built without the `cuda` feature") {
        assert!(output.status.success(), "{stdout}{stderr}");
    } else {
        assert!(!output.status.success(), "{stdout}{stderr}");
        let missing = "no CUDA driver on this runner (libcuda.so not found)";
        assert!(stderr.contains(missing), "{stdout}{stderr}");
    }
}
