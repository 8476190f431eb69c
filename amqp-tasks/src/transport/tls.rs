//! TLS for `amqps://` URLs, with rustls on the ring provider. The query parameters of RabbitMQ's
//! URI spec that lapin's parser ignores are read here: `cacertfile` (a private CA; otherwise the
//! platform's roots), `certfile` + `keyfile` (a client certificate), `verify=verify_none`
//! (allowed, with a warning at every connect), `server_name_indication` (the name sent and
//! verified; `disable` sends none). A certificate that does not verify is a connect error naming
//! the reason: there is no fallback to plain TCP.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The TLS part of an `amqps://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    pub(crate) cacertfile: Option<PathBuf>,
    pub(crate) certfile: Option<PathBuf>,
    pub(crate) keyfile: Option<PathBuf>,
    /// `verify=verify_none`: the server's certificate is not checked.
    pub(crate) verify_none: bool,
    /// `server_name_indication=<name>`, or `disable`.
    pub(crate) server_name: Option<String>,
}

impl TlsOptions {
    /// Takes one query parameter if it is a TLS one; false if it is not.
    pub(crate) fn take(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "cacertfile" => self.cacertfile = Some(PathBuf::from(value)),
            "certfile" => self.certfile = Some(PathBuf::from(value)),
            "keyfile" => self.keyfile = Some(PathBuf::from(value)),
            "verify" => {
                self.verify_none = match value {
                    "verify_none" => true,
                    "verify_peer" => false,
                    other => {
                        return Err(format!(
                            "`verify={other}`: expected verify_peer or verify_none"
                        ));
                    }
                }
            }
            "server_name_indication" => self.server_name = Some(value.to_owned()),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether any TLS parameter was given.
    pub(crate) fn is_set(&self) -> bool {
        *self != TlsOptions::default()
    }
}

/// What connecting over TLS needs: the rustls configuration and the name to verify.
#[derive(Debug, Clone)]
pub(crate) struct Tls {
    pub(crate) config: Arc<ClientConfig>,
    /// The name the server's certificate must carry (and SNI sends, unless disabled).
    pub(crate) server_name: String,
    /// Logged as a warning at every connect.
    pub(crate) unverified: bool,
}

impl Tls {
    /// Builds the rustls configuration for connecting to `host`.
    pub(crate) fn new(options: &TlsOptions, host: &str) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = if options.verify_none {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
        } else {
            builder.with_root_certificates(roots(options.cacertfile.as_deref())?)
        };
        let mut config = match (&options.certfile, &options.keyfile) {
            (Some(certfile), Some(keyfile)) => {
                let certs = certificates(certfile)?;
                let key = PrivateKeyDer::from_pem_file(keyfile)
                    .map_err(|e| format!("TLS: the key file {}: {e}", keyfile.display()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("TLS: the client certificate: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("TLS: `certfile` and `keyfile` go together".to_owned()),
        };
        let server_name = match options.server_name.as_deref() {
            Some("disable") => {
                config.enable_sni = false;
                host.to_owned()
            }
            Some(name) => name.to_owned(),
            None => host.to_owned(),
        };
        ServerName::try_from(server_name.clone())
            .map_err(|e| format!("TLS: `{server_name}` is not a server name: {e}"))?;
        Ok(Tls {
            config: Arc::new(config),
            server_name,
            unverified: options.verify_none,
        })
    }
}

/// The trust anchors: the given CA file, or the platform's roots.
fn roots(cacertfile: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match cacertfile {
        Some(path) => {
            for cert in certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("TLS: the CA file {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "TLS: no root certificates found on this system: give `cacertfile`".to_owned(),
                );
            }
        }
    }
    Ok(roots)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("TLS: {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("TLS: no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// `verify=verify_none`: any certificate is accepted (the handshake's signatures are still
/// checked, so the key exchange is with whoever holds the certificate's key).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_read() {
        let mut options = TlsOptions::default();
        assert_eq!(options.take("cacertfile", "/ca.pem"), Ok(true));
        assert_eq!(options.take("verify", "verify_none"), Ok(true));
        assert_eq!(options.take("heartbeat", "10"), Ok(false));
        assert!(options.take("verify", "maybe").is_err());
        assert!(options.is_set() && options.verify_none);
        assert_eq!(options.cacertfile.as_deref(), Some(Path::new("/ca.pem")));
    }

    #[test]
    fn incomplete_or_missing_files_are_clear_errors() {
        let only_cert = TlsOptions {
            certfile: Some("/nowhere/cert.pem".into()),
            ..TlsOptions::default()
        };
        let error = Tls::new(&only_cert, "localhost").unwrap_err();
        assert!(error.contains("go together"), "{error}");
        let missing = TlsOptions {
            cacertfile: Some("/nowhere/ca.pem".into()),
            ..TlsOptions::default()
        };
        let error = Tls::new(&missing, "localhost").unwrap_err();
        assert!(error.contains("/nowhere/ca.pem"), "{error}");
        let unverified = TlsOptions {
            verify_none: true,
            ..TlsOptions::default()
        };
        assert!(Tls::new(&unverified, "localhost").unwrap().unverified);
    }
}
