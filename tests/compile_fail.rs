//! What `#[firebrand::job]` refuses to compile, and the message each mistake gets: the
//! expected output sits beside each case in `tests/compile_fail/*.stderr`.
//! `TRYBUILD=overwrite cargo test -p firebrand-macros --test compile_fail` writes them afresh. Each case
//! builds against `firebrand` with its default features (the dev-dependency of `firebrand-macros`,
//! which declares this test), so the output is the same whatever else the `cargo test` builds.

#[test]
fn job_mistakes_do_not_compile_and_say_why() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("../tests/compile_fail/*.rs");
}
