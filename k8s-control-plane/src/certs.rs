//! The control plane's credentials: a CA, the API server's serving certificate, the service
//! account signing key, and a bearer token for each client.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::process::write_private;

/// Where [`write`] put each file.
pub(crate) struct Files {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub service_account_key: PathBuf,
    /// Its public key, which the API server verifies tokens with: it reads no public key
    /// out of a PKCS #8 private key.
    pub service_account_public_key: PathBuf,
}

/// Makes the CA, the serving certificate (for 127.0.0.1, localhost and the in-cluster names)
/// and the service-account key (ECDSA P-256, which the API server signs ES256 tokens with),
/// and writes them into `dir`.
pub(crate) fn write(dir: &Path) -> Result<Files, Box<dyn std::error::Error>> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "firebrand-test-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])?;
    server_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    let service_account_key = KeyPair::generate()?;
    let files = Files {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
        service_account_key: dir.join("service-account.key"),
        service_account_public_key: dir.join("service-account.pub"),
    };
    write_private(&files.ca_cert, ca_pem.as_bytes())?;
    write_private(&files.ca_key, ca_key_pem.as_bytes())?;
    write_private(&files.server_cert, server_cert.pem().as_bytes())?;
    write_private(&files.server_key, server_key.serialize_pem().as_bytes())?;
    write_private(
        &files.service_account_key,
        service_account_key.serialize_pem().as_bytes(),
    )?;
    write_private(
        &files.service_account_public_key,
        service_account_key.public_key_pem().as_bytes(),
    )?;
    Ok(files)
}

/// The bearer tokens of the control plane's own clients, random per control plane.
pub(crate) struct Tokens {
    /// A cluster admin (`system:masters`): tests and the kubelet.
    pub admin: String,
    /// `system:kube-controller-manager`, as RBAC's bootstrap roles name it.
    pub controller_manager: String,
    /// `system:kube-scheduler`.
    pub scheduler: String,
}

impl Tokens {
    pub(crate) fn new() -> Self {
        let token = || uuid::Uuid::new_v4().simple().to_string();
        Self {
            admin: token(),
            controller_manager: token(),
            scheduler: token(),
        }
    }

    /// The API server's `--token-auth-file`: `token,user,uid,"group,..."` a line.
    pub(crate) fn write(&self, file: &Path) -> std::io::Result<()> {
        let lines = format!(
            "{},admin,admin,\"system:masters\"\n{},system:kube-controller-manager,kube-controller-manager\n{},system:kube-scheduler,kube-scheduler\n",
            self.admin, self.controller_manager, self.scheduler
        );
        write_private(file, lines.as_bytes())
    }
}
