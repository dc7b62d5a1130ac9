//! Certificates for tests, the demo and the benchmark, made by the real `pgferry-certs`: a CA
//! per migration, a source (DE) and a target (FR) certificate for 127.0.0.1 and localhost.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::{bin_path, command_output};

/// Migration id used by the tests.
pub const MIGRATION: &str = "test-migration";

/// A CA plus a source and a target certificate, made by the real `pgferry-certs`.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// `init` a CA for [`MIGRATION`] in `dir`, then issue `source.pem` (DE) and `target.pem` (FR).
    pub fn make(dir: &Path) -> Result<Self> {
        Self::make_for(dir, MIGRATION)
    }

    /// The same for another migration id (the demo's, the benchmark's).
    pub fn make_for(dir: &Path, migration: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let c = Certs {
            dir: dir.to_path_buf(),
        };
        c.certs(&["init", "--migration", migration])?;
        c.issue("source", &["--role", "source", "--region", "DE"])?;
        c.issue("target", &["--role", "target", "--region", "FR"])?;
        Ok(c)
    }

    /// Runs `pgferry-certs ARGS` in the certificate directory.
    pub fn certs(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(bin_path("pgferry-certs"));
        cmd.args(args).arg("--dir").arg(&self.dir);
        command_output(&mut cmd)
    }

    /// Issues `NAME.pem`/`NAME.key` with the extra `args` (role, region, …) for host 127.0.0.1.
    pub fn issue(&self, name: &str, args: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let out = self.dir.join(name);
        let mut full = vec!["issue", "--name", "127.0.0.1", "--name", "localhost"];
        full.extend_from_slice(args);
        let out_s = out.to_string_lossy().to_string();
        full.extend_from_slice(&["--out", &out_s]);
        self.certs(&full)?;
        Ok((self.pem(name), self.key(name)))
    }

    /// `--ca CA --cert NAME.pem --key NAME.key`: how an agent run with certificate `name`
    /// is told who it is.
    pub fn tls_args(&self, name: &str) -> Vec<std::ffi::OsString> {
        vec![
            "--ca".into(),
            self.ca().into(),
            "--cert".into(),
            self.pem(name).into(),
            "--key".into(),
            self.key(name).into(),
        ]
    }

    pub fn pem(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn revocation_list(&self) -> PathBuf {
        self.dir.join("revoked.txt")
    }
    /// SHA-256 fingerprint (lowercase hex) of a certificate file.
    pub fn fingerprint(&self, name: &str) -> String {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(self.pem(name)).unwrap();
        pgferry_common::identity::Fingerprint::of_der(&der).to_string()
    }
}
