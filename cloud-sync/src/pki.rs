//! The fleet's certificates (rcgen): the cloud's CA, the gRPC server certificate it issues to
//! itself, depot certificates from a CSR, and the depot's key and CSR. Pure apart from the
//! random numbers; callers store the PEM where they keep secrets.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(rcgen::Error),
    #[error("the certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("{0} is not a host name or IP address for a certificate")]
    BadName(String),
}

/// A certificate just issued, with what the store keeps about it.
#[derive(Clone, Debug)]
pub struct Issued {
    pub pem: String,
    /// Lower-case hex.
    pub serial: String,
    pub not_after_ms: i64,
}

/// The fleet CA: its certificate and key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The certificate lifetime of the CA itself: it outlives every appliance.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Certificates start this long before they are issued, so a depot whose clock is a little
/// behind can use its new certificate at once.
const BACKDATE: Duration = Duration::from_secs(300);

impl Ca {
    /// A new CA (ECDSA P-256).
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Self::load(&cert.pem(), &key.serialize_pem())
    }

    /// The CA from its stored PEM.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let der = first_der(cert_pem)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            fingerprint: fingerprint(&der),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// SHA-256 of the CA certificate's DER, lower-case hex: what enrolment tokens pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A server certificate for the cloud's gRPC port and a fresh key, both PEM.
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Issued, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("atlasmesh cloud");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) if is_host_name(n) => n
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| PkiError::BadName(n.clone())),
                Err(_) => Err(PkiError::BadName(n.clone())),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.sign(params, lifetime, |p| p.signed_by(&key, &self.issuer))?;
        Ok((issued, key.serialize_pem()))
    }

    /// A client certificate for a depot, for the public key in `csr_pem`. Everything in the
    /// request except its key is ignored: the cloud names the depot (CN = depot id).
    pub fn sign_depot(
        &self,
        csr_pem: &str,
        depot_id: &str,
        depot_name: &str,
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(depot_id);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, depot_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, lifetime, |p| {
            csr.params = p;
            csr.signed_by(&self.issuer)
        })
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        lifetime: Duration,
        sign: impl FnOnce(CertificateParams) -> Result<rcgen::Certificate, rcgen::Error>,
    ) -> Result<Issued, PkiError> {
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = sign(params)?;
        Ok(Issued {
            pem: cert.pem(),
            serial: serial_hex,
            not_after_ms: unix_ms(not_after),
        })
    }
}

/// Checks that a CSR parses and its signature holds, before anything is spent on it.
pub fn check_csr(csr_pem: &str) -> Result<(), PkiError> {
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|_| ())
        .map_err(PkiError::BadCsr)
}

/// A new depot key and a CSR for it, both PEM.
pub fn depot_key_and_csr(depot_name_hint: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(depot_name_hint);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// What the cloud reads from a depot's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepotCert {
    pub depot_id: String,
    pub serial: String,
    pub not_after_ms: i64,
}

/// Reads the depot id (CN), serial and expiry from a DER certificate.
pub fn read_depot_cert(der: &[u8]) -> Result<DepotCert, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let depot_id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::BadCertificate("no common name".into()))?
        .to_owned();
    Ok(DepotCert {
        depot_id,
        serial: hex::encode(cert.raw_serial()),
        not_after_ms: cert.validity().not_after.timestamp() * 1000,
    })
}

/// The expiry of the first certificate in a PEM file, in Unix ms.
pub fn pem_not_after_ms(pem: &str) -> Result<i64, PkiError> {
    let der = first_der(pem)?;
    Ok(read_depot_cert(&der)?.not_after_ms)
}

/// SHA-256 of a DER certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The DER of the first certificate in a PEM text.
pub fn first_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::BadCertificate("no certificate in the PEM text".into()))?
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::BadCertificate(e.to_string()))
}

fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn random_serial() -> SerialNumber {
    // 16 random bytes with the top bit clear: a positive serial, as RFC 5280 asks.
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Now, in Unix ms.
pub fn unix_ms_now() -> i64 {
    unix_ms(SystemTime::now())
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_a_depot_csr_naming_the_depot_not_the_request() {
        let ca = Ca::generate("test fleet CA").unwrap();
        let again = Ca::load(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let (_key, csr) = depot_key_and_csr("I claim to be another depot").unwrap();
        let issued = again
            .sign_depot(&csr, "d-123", "north", Duration::from_secs(3600))
            .unwrap();
        let read = read_depot_cert(&first_der(&issued.pem).unwrap()).unwrap();
        assert_eq!(read.depot_id, "d-123");
        assert_eq!(read.serial, issued.serial);
        // The certificate's time has one-second resolution.
        assert!((read.not_after_ms - issued.not_after_ms).abs() < 1000);
        assert!(matches!(
            ca.sign_depot("not a csr", "d", "n", Duration::from_secs(1)),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn server_certificate_names_hosts_and_addresses() {
        let ca = Ca::generate("test fleet CA").unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (issued, key) = ca.issue_server(&names, Duration::from_secs(60)).unwrap();
        assert!(issued.pem.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        let err = ca
            .issue_server(
                &["bad name with spaces\u{0}".to_owned()],
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(err, PkiError::BadName(_)), "{err}");
    }
}
