//! What `#[firebrand::job]` refuses to compile, and the message each mistake gets: the
//! expected output sits beside each case in `tests/compile_fail/*.stderr`.
//! `TRYBUILD=overwrite cargo test -p firebrand --test compile_fail` writes them afresh.

#[test]
fn job_mistakes_do_not_compile_and_say_why() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("../tests/compile_fail/*.rs");
}
