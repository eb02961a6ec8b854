//! Two `#[job]` functions that declare one name: an error at start-up naming both, from
//! `Registry::collected` and so from `Pool::build` and a runner's `run_if_child`. A test binary
//! of its own: the duplicate is in every collection of this binary.

mod images {
    #[firebrand::job(name = "resize")]
    pub async fn resize(width: u32) -> u32 {
        width
    }
}

mod video {
    #[firebrand::job(name = "resize")]
    pub async fn scale(width: u32) -> u32 {
        width * 2
    }
}

#[test]
fn two_jobs_with_one_name_are_refused_naming_both_functions() {
    let error = firebrand::Registry::collected().unwrap_err();
    assert_eq!(
        error,
        firebrand::RegistryError::DuplicateFunction {
            name: "resize".into(),
            first: "duplicate_jobs::images::resize".into(),
            second: "duplicate_jobs::video::scale".into(),
        }
    );
    let text = error.to_string();
    assert!(
        text.contains("`duplicate_jobs::images::resize` and `duplicate_jobs::video::scale`"),
        "{text}"
    );
}

#[tokio::test]
async fn a_pool_of_the_collected_jobs_does_not_start() {
    match firebrand::Pool::builder().build().await {
        Err(firebrand::PoolError::Registry(error)) => {
            assert!(
                error.to_string().contains("two jobs are named `resize`"),
                "{error}"
            )
        }
        other => panic!("expected the duplicate, got {:?}", other.map(|_| ())),
    }
}
