//! Who may connect, and what a runner does with hostile input.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{local_backend, pool, spawn_runner, within, Recording};
use firebrand::internals::tls::{self, IssuedCert, PoolCa, PARENT_SERVER_NAME};
use firebrand::internals::token::{BootToken, RunnerSettings, PARENT_ENV};
use firebrand::internals::wire::{self, CallHead, Hello, HelloReply, ReplyHead};
use firebrand::runner::exit_code;
use firebrand::{BootError, CallError, Job, Pool};
use firebrand_runner::{ECHO, PID};
use rustls::pki_types::CertificateDer;

const SECOND: Duration = Duration::from_secs(1);

/// Runs a runner process to its end and returns its exit code and stderr.
async fn run_runner(token: &BootToken) -> (i32, String) {
    let child = spawn_runner(&token.encode());
    let output = within(30 * SECOND, child.wait_with_output()).await.unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A pool whose boots start nothing, so that tests can dial with its tokens themselves.
async fn pool_with_silent_boots(
    boots: usize,
) -> (Pool, Recording, Vec<tokio::task::JoinHandle<()>>) {
    let backend = Recording::silent();
    let pool = pool()
        .backend(backend.clone())
        .max(boots)
        .max_concurrency(1)
        .boot_timeout(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let calls = (0..boots)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let _ = pool.call(&PID, ()).await;
            })
        })
        .collect();
    let mut counts = pool.watch_runners();
    within(10 * SECOND, counts.wait_for(|c| c.booting == boots))
        .await
        .unwrap();
    while backend.boots() < boots {
        tokio::task::yield_now().await;
    }
    (pool, backend, calls)
}

#[tokio::test]
async fn a_runner_id_is_admitted_once_and_only_with_its_own_certificate() {
    let (pool, backend, calls) = pool_with_silent_boots(2).await;
    let (first, second) = (backend.token(0), backend.token(1));

    // The first runner's certificate, claiming to be the second runner.
    let mut impostor = first.clone();
    impostor.runner_id = second.runner_id;
    let (code, stderr) = run_runner(&impostor).await;
    assert_eq!(code, exit_code::REFUSED, "{stderr}");
    assert!(stderr.contains("was not issued to runner"), "{stderr}");

    // An id the pool never issued.
    let mut unknown = first.clone();
    unknown.runner_id = uuid::Uuid::new_v4();
    let (code, stderr) = run_runner(&unknown).await;
    assert_eq!(code, exit_code::REFUSED, "{stderr}");
    assert!(stderr.contains("unknown runner id"), "{stderr}");

    // The genuine runner is admitted and serves the waiting call...
    let mut genuine = spawn_runner(&first.encode());
    let mut counts = pool.watch_runners();
    within(10 * SECOND, counts.wait_for(|c| c.ready == 1))
        .await
        .unwrap();

    // ...and its token cannot be used again.
    let (code, stderr) = run_runner(&first).await;
    assert_eq!(code, exit_code::REFUSED, "{stderr}");
    assert!(stderr.contains("has already connected"), "{stderr}");

    for call in calls {
        call.abort();
    }
    pool.shutdown().await;
    let status = within(10 * SECOND, genuine.wait()).await.unwrap();
    assert_eq!(status.code(), Some(exit_code::CLEAN));
}

#[tokio::test]
async fn a_runner_whose_boot_timed_out_is_refused() {
    let backend = Recording::silent();
    let pool = pool()
        .backend(backend.clone())
        .boot_timeout(Duration::from_millis(300))
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let result = pool.call(&PID, ()).await;
    assert!(
        matches!(&result, Err(CallError::BootFailed(e)) if matches!(**e, BootError::Timeout(_))),
        "{result:?}"
    );
    let (code, stderr) = run_runner(&backend.token(0)).await;
    assert_eq!(code, exit_code::REFUSED, "{stderr}");
    assert!(stderr.contains("was given up on"), "{stderr}");
    pool.shutdown().await;
}

/// Dials the parent in `token` as an attacker would: with `identity`, or no certificate.
async fn dial(
    token: &BootToken,
    identity: Option<&IssuedCert>,
) -> Result<HelloReply, quinn::ConnectionError> {
    let ca = CertificateDer::from(token.ca_cert.clone());
    let crypto = match identity {
        Some(identity) => tls::client_crypto(&ca, identity).unwrap(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).unwrap();
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            config.alpn_protocols = vec![wire::ALPN.to_vec()];
            quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap()
        }
    };
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = token.parent_addrs[0].parse().unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let attempt = async {
        let connection = endpoint
            .connect_with(config, addr, &token.server_name)
            .unwrap()
            .await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&wire::PROTOCOL_VERSION.to_be_bytes())
            .await?;
        let hello = Hello {
            runner_id: token.runner_id,
            manifest: firebrand_runner::registry().manifest(),
            pid: 1,
            claim: None,
        };
        wire::write_frame(&mut send, &hello).await?;
        let reply: HelloReply = wire::read_head(&mut recv).await?;
        Ok::<_, anyhow::Error>((connection, reply))
    };
    match within(10 * SECOND, attempt).await {
        Ok((_, reply)) => Ok(reply),
        Err(e) => Err(match e.downcast::<quinn::ConnectionError>() {
            Ok(e) => e,
            Err(e) => match e.downcast::<wire::WireError>() {
                Ok(wire::WireError::Read(quinn::ReadError::ConnectionLost(e))) => e,
                Ok(wire::WireError::Write(quinn::WriteError::ConnectionLost(e))) => e,
                other => panic!("unexpected failure: {other:?}"),
            },
        }),
    }
}

/// Whether the parent closed the connection with a TLS alert (QUIC crypto error 0x1XX).
fn tls_alert(error: &quinn::ConnectionError) -> bool {
    matches!(error, quinn::ConnectionError::ConnectionClosed(close)
        if (0x100..0x200).contains(&u64::from(close.error_code)))
}

#[tokio::test]
async fn clients_without_a_certificate_or_from_another_ca_are_refused() {
    let (pool, backend, calls) = pool_with_silent_boots(1).await;
    let token = backend.token(0);

    let error = dial(&token, None).await.unwrap_err();
    assert!(tls_alert(&error), "no certificate: {error}");

    // A certificate for the right runner id, signed by another CA.
    let rogue = PoolCa::generate("rogue").unwrap();
    let forged = rogue
        .issue_runner(token.runner_id, Duration::from_secs(60))
        .unwrap();
    let error = dial(&token, Some(&forged)).await.unwrap_err();
    assert!(tls_alert(&error), "another CA: {error}");
    assert_eq!(pool.stats().ready, 0);

    // The same client with the identity the pool issued is admitted: the refusals above were
    // about the certificates, not about this client.
    let reply = dial(&token, Some(&token.runner_identity())).await.unwrap();
    assert_eq!(
        reply,
        HelloReply::Accepted {
            idle_override: None
        }
    );
    for call in calls {
        call.abort();
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_runner_with_a_different_registry_is_refused_at_connect() {
    const EXTRA: Job<u32, u32> = Job::new("only.on.parent");
    let mut registry = firebrand_runner::registry();
    registry
        .register(&EXTRA, |n: u32| async move { Ok::<_, String>(n) })
        .unwrap();
    common::init_tracing();
    let pool = Pool::builder()
        .registry(&registry)
        .backend(local_backend())
        .boot_timeout(Duration::from_secs(20))
        .boot_attempts(1)
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    match within(10 * SECOND, pool.call(&ECHO, vec![1])).await {
        Err(CallError::BootFailed(e)) => match &*e {
            BootError::Incompatible(why) => {
                assert!(
                    why.contains("job `only.on.parent` is missing on the runner"),
                    "{why}"
                )
            }
            other => panic!("expected Incompatible, got {other}"),
        },
        other => panic!("expected a boot failure, got {other:?}"),
    }
    assert!(
        started.elapsed() < 5 * SECOND,
        "refused at connect, not at the boot timeout"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_malformed_token_is_a_clear_error() {
    let fd_env = firebrand::runner::PARENT_FD_ENV;
    for (name, value, expected) in [
        (PARENT_ENV, "garbage", "unsupported boot token version"),
        (PARENT_ENV, "fb1.!!!", "not valid base64"),
        (PARENT_ENV, "fb1.AAAA", "boot token is malformed"),
        // A token descriptor that is not open, or not a number.
        (fd_env, "57", "names descriptor 57, which is not open"),
        (fd_env, "stdin", "is not a descriptor number"),
    ] {
        let output = tokio::process::Command::new(common::RUNNER)
            .env(name, value)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(exit_code::BAD_TOKEN));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{value}: {stderr}");
    }
    let output = tokio::process::Command::new(common::RUNNER)
        .env_remove(PARENT_ENV)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("FIREBRAND_PARENT"));
}

/// The test plays the parent itself, so that it can send what no pool would.
#[tokio::test]
async fn hostile_frames_get_errors_and_the_runner_keeps_serving() {
    let parent = common::RawParent::new();
    let mut runner = spawn_runner(&parent.token(common::raw_settings()).encode());
    let (connection, _control) = parent.admit().await;

    // A head frame that announces 4 GiB.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    send.write_all(&[0; 64]).await.unwrap();
    let _ = send.finish();
    let reply: ReplyHead = wire::read_head(&mut recv).await.unwrap();
    assert!(
        matches!(&reply, ReplyHead::Malformed { message } if message.contains("exceeds the limit")),
        "{reply:?}"
    );

    // A valid head whose argument frame exceeds the runner's payload limit.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut request = wire::encode_frame(&CallHead {
        job: ECHO.name().into(),
        timeout_ms: 0,
        trace_id: 0,
        resource: 0,
    })
    .unwrap()
    .to_vec();
    request.extend_from_slice(&(2u32 << 20).to_be_bytes());
    send.write_all(&request).await.unwrap();
    let _ = send.finish();
    let reply: ReplyHead = wire::read_head(&mut recv).await.unwrap();
    assert!(matches!(reply, ReplyHead::Malformed { .. }), "{reply:?}");

    // A string that claims an absurd length inside a small frame.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut head = vec![0xFD];
    head.extend_from_slice(&(u64::MAX / 4).to_le_bytes());
    let mut request = (head.len() as u32).to_be_bytes().to_vec();
    request.extend_from_slice(&head);
    send.write_all(&request).await.unwrap();
    let _ = send.finish();
    let reply: ReplyHead = wire::read_head(&mut recv).await.unwrap();
    assert!(matches!(reply, ReplyHead::Malformed { .. }), "{reply:?}");

    // Arguments of the wrong type for the job.
    let (_send, mut recv) = common::raw_request(&connection, ECHO.name(), 0, &u8::MAX).await;
    let reply: ReplyHead = wire::read_head(&mut recv).await.unwrap();
    assert!(matches!(reply, ReplyHead::BadArgs { .. }), "{reply:?}");

    // The runner still serves a well-formed call.
    let (_send, mut recv) =
        common::raw_request(&connection, ECHO.name(), 5_000, &vec![1u8, 2, 3]).await;
    let reply: ReplyHead = wire::read_head(&mut recv).await.unwrap();
    assert_eq!(reply, ReplyHead::Ok);
    let body = wire::read_frame(&mut recv, 1 << 20).await.unwrap();
    assert_eq!(body.decode::<Vec<u8>>().unwrap(), vec![1, 2, 3]);

    connection.close(wire::close::DONE, b"done");
    let status = within(10 * SECOND, runner.wait()).await.unwrap();
    assert_eq!(status.code(), Some(exit_code::CLEAN));
}

#[tokio::test]
async fn a_runner_that_never_reaches_its_parent_exits_at_the_failsafe() {
    // A UDP port that nothing listens on.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    drop(socket);
    let ca = PoolCa::generate("failsafe").unwrap();
    let id = uuid::Uuid::new_v4();
    let token = BootToken::new(
        vec![addr.to_string()],
        PARENT_SERVER_NAME.into(),
        ca.cert(),
        &ca.issue_runner(id, Duration::from_secs(60)).unwrap(),
        id,
        RunnerSettings {
            max_concurrency: 1,
            idle_shutdown_after: None,
            connect_failsafe: Duration::from_millis(1500),
            drain_grace: Duration::from_secs(1),
            max_payload_len: 1 << 20,
            peer_timeout: Duration::from_secs(1),
            keep_alive: Duration::from_millis(300),
            congestion: Default::default(),
            log_filter: "off".into(),
            forward_output: false,
        },
    );
    let started = std::time::Instant::now();
    let (code, stderr) = run_runner(&token).await;
    assert_eq!(code, exit_code::UNREACHABLE, "{stderr}");
    assert!(
        stderr.contains("parent not reached within 1.5s"),
        "{stderr}"
    );
    assert!(started.elapsed() < 10 * SECOND);
}

#[tokio::test]
async fn a_protocol_version_mismatch_is_refused_with_both_versions() {
    let (pool, backend, calls) = pool_with_silent_boots(1).await;
    let token = backend.token(0);
    let ca = CertificateDer::from(token.ca_cert.clone());
    let crypto = tls::client_crypto(&ca, &token.runner_identity()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connection = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            token.parent_addrs[0].parse().unwrap(),
            &token.server_name,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&(wire::PROTOCOL_VERSION + 1).to_be_bytes())
        .await
        .unwrap();
    match within(10 * SECOND, connection.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, wire::close::REFUSED);
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(
                reason.contains(&format!(
                    "the parent speaks {}, the runner {}",
                    wire::PROTOCOL_VERSION,
                    wire::PROTOCOL_VERSION + 1
                )),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other}"),
    }
    for call in calls {
        call.abort();
    }
    pool.shutdown().await;
}

/// What the kernel shows any process of the same user as `pid`'s initial environment.
fn environ_of(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    String::from_utf8_lossy(&raw).replace('\0', "\n")
}

#[tokio::test]
async fn an_executed_runner_s_environment_holds_no_token() {
    let backend = common::Recording::new(common::local_backend());
    let pool = common::pool()
        .backend(backend.clone())
        .max(1)
        .build()
        .await
        .unwrap();
    let pid = pool.call(&firebrand_runner::PID, ()).await.unwrap();
    let environ = environ_of(pid);
    let token = backend.seen.lock().tokens[0].clone();
    assert!(token.starts_with("fb1."), "the backend was given a token");
    assert!(
        !environ.contains(&token),
        "the token is in /proc/{pid}/environ"
    );
    assert!(!environ.contains("fb1."), "{environ}");
    assert!(
        environ.contains(firebrand::internals::token::PARENT_FD_ENV),
        "{environ}"
    );
    // The pipe it came through is closed in the runner once read.
    let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3"));
    assert!(
        fd3.as_ref()
            .map_or(true, |l| !l.to_string_lossy().starts_with("pipe:")),
        "descriptor 3 is still the token pipe: {fd3:?}"
    );
    pool.shutdown().await;
}
