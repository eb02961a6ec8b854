//! The path of an example's binary, which `cargo test` builds with the tests. Included by the
//! tests that run an example (`#[path]`), which share nothing else.

use std::path::PathBuf;

/// `target/<profile>/examples/<name>`, beside this test's `target/<profile>/deps/<test>-<hash>`.
pub fn example_binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("the test's own path");
    let profile = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let example = profile.join("examples").join(name);
    assert!(
        example.exists(),
        "{} is missing: run `cargo test` (which builds the examples) or `cargo build --example {name}` first",
        example.display()
    );
    example
}
